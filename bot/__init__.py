"""gpuherd surfaces: command grammar, platform-neutral replies, shell, CLI (and later Slack,
Discord, HTTP). Surfaces parse, call core.service.GpuService, render."""
