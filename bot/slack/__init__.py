"""Slack: the `/gpu` slash command, buttons, notices and the App Home on slack-bolt's AsyncApp."""
