"""Settings: GPUHERD_* environment variables, a .env file, and `config.toml` in the data
directory, in that order of precedence. A bad value stops the start with the key named.

Decisions:

- Every setting that is wrong or unusable is a `ConfigError` from `load_settings`, one line that
  names the variable (`GPUHERD_PROVIDERS …`); the CLI prints it and exits with 2. Nothing is
  ignored without a word: a `config.toml` that is not a file, a provider name that does not
  exist, a data directory that is a file or cannot be created all stop the start.
- `load_settings` creates the data directory: whether it can be created is a property of the
  setting, and finding out later is a traceback from whoever writes there first.
- `providers` takes a JSON list (`["vast","aws"]`) or, as people type it, a comma-separated
  list (`vast,aws`).
- Names in settings (`admins`, `default_team`, `local_user`) follow `core/names.py`, like names
  typed in chat; the default `local_user` (the login name) is made to fit rather than refused.
- The problems of one start are joined on one line, `; `-separated."""

from __future__ import annotations

import difflib
import getpass
import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError, InvalidInput
from .names import check_principal, check_team, safe_principal
from .text import clip

ENV_PREFIX = "GPUHERD_"
CONFIG_FILE = "config.toml"
PROVIDER_NAMES = ("vast", "runpod", "aws", "surf", "sandbox")   # providers/registry.py builds these


def default_home() -> Path:
    return Path(platformdirs.user_data_dir("gpuherd", appauthor=False))


def home_from_env() -> Path:
    raw = os.environ.get(f"{ENV_PREFIX}HOME")
    return Path(raw).expanduser() if raw else default_home()


def _local_user() -> str:
    """The login name, made to fit the principal pattern (`local:<name>`)."""
    try:
        name = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "local"
    return safe_principal(name).partition(":")[2]


def _env(field: str, official: str) -> AliasChoices:
    """A setting read from GPUHERD_<FIELD>, the official tool's variable, or `field` in config.toml."""
    return AliasChoices(f"{ENV_PREFIX}{field.upper()}", official, field)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        populate_by_name=True,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(default_factory=default_home, description="data directory")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in home")
    templates_file: Path | None = Field(default=None, description="team templates (TOML); default home/templates.toml")

    # providers
    providers: list[str] | None = Field(default=None, description="restrict to these providers")
    sandbox: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto: use the simulated sandbox when no real provider is configured")
    sandbox_seed: int = 42
    sandbox_time_scale: float = Field(default=0.2, ge=0, le=100,
                                      description="multiplies simulated boot/stop timings; 0 = instant")
    sandbox_faults: str = Field(default="", description="e.g. 'capacity=0.2,timeout=0.1,rate_limit=0.1'")
    sandbox_latency_s: float = Field(default=0.0, ge=0, le=60,
                                     description="seconds every simulated provider call takes (a slow cloud)")

    # real providers: each is configured when its credentials are set. The variable names are the
    # official tools' own (VAST_API_KEY, VAST_URL, RUNPOD_API_KEY, ...), so an existing setup works.
    vast_api_key: SecretStr | None = Field(default=None, validation_alias=_env("vast_api_key", "VAST_API_KEY"))
    vast_url: str = Field(default="https://console.vast.ai", validation_alias=_env("vast_url", "VAST_URL"),
                          description="vast.ai API base URL (as the vastai CLI's VAST_URL)")
    runpod_api_key: SecretStr | None = Field(default=None,
                                             validation_alias=_env("runpod_api_key", "RUNPOD_API_KEY"))
    runpod_url: str = Field(default="https://api.runpod.io",
                            validation_alias=_env("runpod_url", "RUNPOD_API_BASE_URL"),
                            description="RunPod API base URL (as the runpod SDK's RUNPOD_API_BASE_URL)")
    aws: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto: use AWS EC2 when boto3 finds credentials in the AWS chain")
    aws_regions: list[str] = Field(default_factory=lambda: ["us-east-1"], min_length=1,
                                   description="regions searched for GPU instance types")
    aws_ami: str | None = Field(default=None, description="AMI to boot; default: the newest Deep Learning AMI")
    aws_subnet_id: str | None = None
    aws_security_group_ids: list[str] = Field(default_factory=list)
    aws_key_name: str | None = None
    aws_ebs_gb_month: str = Field(default="0.08", description="gp3 USD per GB-month, billed while stopped")
    surf_api_token: SecretStr | None = Field(default=None,
                                             validation_alias=_env("surf_api_token", "SURF_API_TOKEN"))
    surf_url: str = Field(default="https://gw.live.surfresearchcloud.nl/v1",
                          description="SURF Research Cloud API base URL")
    surf_name_filter: str = Field(default="", description="only workspaces whose name contains this")
    provider_timeout_s: float = Field(default=10.0, gt=0, le=300,
                                      description="per-provider time limit of one search")
    offer_cache_s: float = Field(default=30.0, ge=0, le=3600, description="how long search results are reused")
    reconcile_interval_s: float = Field(default=300.0, ge=10, le=86400,
                                        description="how often every provider's machines are compared with the database")
    attach: list[str] = Field(default_factory=list,
                              description="machines created elsewhere to put under gpuherd, e.g. ['vast:12345']")

    # who is who
    local_user: str = Field(default_factory=_local_user, description="principal name of the shell user")
    local_role: Literal["viewer", "member", "admin"] = "admin"
    default_role: Literal["viewer", "member", "admin"] = Field(
        default="member", description="role of a chat user gpuherd has not seen before")
    default_team: str = "default"
    admins: list[str] = Field(default_factory=list, description="principals that are always admin")
    secret_key: SecretStr | None = Field(
        default=None,
        description="Fernet key sealing the secret arguments of stored confirmations; default: "
                    "secret.key in home, made on first use. Several replicas sharing one database "
                    "must share this key (set the same GPUHERD_SECRET_KEY on each)")

    # behaviour
    boot_timeout_s: float = Field(default=900, gt=0, description="how long start/boot waits for health")
    poll_interval_s: float = Field(default=2.0, gt=0)
    guard_max_sleep_s: float = Field(default=15.0, gt=0, le=300,
                                     description="longest the guard scheduler sleeps between passes")
    guard_lock_name: str = Field(default="gpuherd-guards", min_length=1, max_length=64,
                                 description="names the PostgreSQL advisory lock; one per deployment")
    guard_leader_retry_s: float = Field(default=15.0, gt=0, le=60,
                                        description="how often a standby process tries to take over the guards")

    # Slack (bot/slack): Socket Mode when the app and bot tokens are set, HTTP mode at /slack/events
    # when the signing secret is; the variable names are Slack's own
    slack_bot_token: SecretStr | None = Field(default=None, validation_alias=_env("slack_bot_token", "SLACK_BOT_TOKEN"),
                                              description="the bot token (xoxb-…)")
    slack_app_token: SecretStr | None = Field(default=None, validation_alias=_env("slack_app_token", "SLACK_APP_TOKEN"),
                                              description="the app-level token (xapp-…) for Socket Mode")
    slack_signing_secret: SecretStr | None = Field(
        default=None, validation_alias=_env("slack_signing_secret", "SLACK_SIGNING_SECRET"),
        description="verifies HTTP-mode requests at /slack/events")
    slack_api_url: str = Field(default="https://slack.com/api/", description="Slack Web API base URL (a proxy or a test server)")
    slack_channels: dict[str, str] = Field(default_factory=dict,
                                           description="team -> Slack channel id for the team's notices, e.g. {ml = 'C0123'}")
    slack_admin_channel: str | None = Field(default=None, description="channel id for notices to admins")
    slack_admins: list[str] = Field(default_factory=list, description="Slack user ids that are always admin (U…)")

    # Discord (bot/discord): the gateway bot when the bot token is set; the variable name is the
    # one discord.py's examples use; the base URLs let a proxy or a test server stand in
    discord_bot_token: SecretStr | None = Field(default=None,
                                                validation_alias=_env("discord_bot_token", "DISCORD_BOT_TOKEN"),
                                                description="the bot token from the Developer Portal")
    discord_api_url: str = Field(default="https://discord.com/api/v10",
                                 description="Discord REST API base URL (a proxy or a test server)")
    discord_gateway_url: str = Field(default="wss://gateway.discord.gg/",
                                     description="Discord gateway URL (a proxy or a test server)")
    discord_guilds: list[int] = Field(default_factory=list,
                                      description="servers (guild ids) the bot answers in; empty = every server it is in")
    discord_channels: dict[str, int] = Field(default_factory=dict,
                                             description="team -> Discord channel id for the team's notices and "
                                                         "for owners whose DMs are closed, e.g. {ml = 1234…}")
    discord_admin_channel: int | None = Field(default=None, description="channel id for notices to admins")
    discord_admins: list[int] = Field(default_factory=list, description="Discord user ids that are always admin")
    discord_roles: dict[str, str] = Field(default_factory=dict,
                                          description="Discord role name -> gpuherd role held while the member has "
                                                      "it, e.g. {gpu-admin = 'admin'}")

    # the team server (`gpuherd serve`)
    api_rate_per_minute: int = Field(default=600, ge=1, le=1_000_000,
                                     description="requests a minute each API key may make, per replica")
    api_burst: int = Field(default=120, ge=1, le=100_000, description="requests an API key may make at once")

    @field_validator("slack_api_url")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value if value.endswith("/") else value + "/"   # slack_sdk joins method names onto it

    @field_validator("discord_api_url", "discord_gateway_url")
    @classmethod
    def _discord_url(cls, value: str, info: Any) -> str:
        schemes = ("ws://", "wss://") if info.field_name == "discord_gateway_url" else ("http://", "https://")
        if not value.startswith(schemes):
            raise ValueError(f"must be a {schemes[0].rstrip(':/')}(s) URL")
        return value.rstrip("/") if info.field_name == "discord_api_url" else value

    @field_validator("discord_roles")
    @classmethod
    def _discord_roles(cls, value: dict[str, str]) -> dict[str, str]:
        for name, role in value.items():
            if role not in ("viewer", "member", "admin"):
                raise ValueError(f"Discord role '{name[:40]}' maps to '{role[:20]}': use viewer, member or admin")
        return value

    @field_validator("slack_admins")
    @classmethod
    def _slack_ids(cls, value: list[str]) -> list[str]:
        for uid in value:
            if not (uid[:1] in ("U", "W") and uid[1:].isalnum() and uid.isupper() and 3 <= len(uid) <= 32):
                raise ValueError(f"'{uid[:40]}' is not a Slack user id (U… or W…)")
        return value

    @property
    def slack_configured(self) -> bool:
        """A bot token and a way in (Socket Mode's app token or HTTP mode's signing secret)."""
        return self.slack_bot_token is not None and (self.slack_app_token is not None
                                                     or self.slack_signing_secret is not None)

    @property
    def discord_configured(self) -> bool:
        return self.discord_bot_token is not None

    @property
    def all_admins(self) -> list[str]:
        """`admins` plus the chat user ids of `slack_admins` and `discord_admins` as principals."""
        return [*self.admins, *(f"slack:{uid}" for uid in self.slack_admins),
                *(f"discord:{uid}" for uid in self.discord_admins)]

    @field_validator("providers", mode="before")
    @classmethod
    def _provider_list(cls, value: Any) -> Any:
        if isinstance(value, str):      # `vast,aws` as typed (pydantic-settings reads JSON first)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(f"names no provider; leave it unset for all, or name some of {', '.join(PROVIDER_NAMES)}")
        for name in value:
            if name not in PROVIDER_NAMES:
                close = difflib.get_close_matches(name.lower()[:40], PROVIDER_NAMES, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"there is no provider '{clip(name, 40)}'{hint}; known: {', '.join(PROVIDER_NAMES)}")
        return value

    @field_validator("admins")
    @classmethod
    def _admins(cls, value: list[str]) -> list[str]:
        for principal in value:
            _named(check_principal, principal)
        return value

    @field_validator("default_team")
    @classmethod
    def _team(cls, value: str) -> str:
        return _named(check_team, value)

    @field_validator("local_user")
    @classmethod
    def _local(cls, value: str) -> str:
        _named(check_principal, f"local:{value}")
        return value

    @field_validator("home", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return Path(value).expanduser() if isinstance(value, (str, Path)) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = home_from_env() / CONFIG_FILE
        return (init_settings, env_settings, dotenv_settings,
                TomlConfigSettingsSource(settings_cls, toml_file=toml_path))

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'gpuherd.db'}"

    @property
    def resolved_templates_file(self) -> Path:
        return self.templates_file or self.home / "templates.toml"

    @property
    def is_embedded_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")


def _named(check: Any, value: str) -> str:
    """A names.py check as a pydantic validator: its message as the ValueError pydantic wants."""
    try:
        return str(check(value))
    except InvalidInput as exc:
        raise ValueError(exc.message) from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usable_home(home: Path) -> None:
    """The data directory exists (made now) and is a directory gpuherd can write to."""
    where = f"{ENV_PREFIX}HOME ({clip(str(home), 200)})"
    if home.exists() and not home.is_dir():
        raise ConfigError(f"{where} is a file, not a directory: point it at a directory for gpuherd's data.")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be created: {_one_line(exc.strerror or str(exc))}.") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} is not writable by this user.")


def load_settings(**overrides: Any) -> Settings:
    """Settings or a ConfigError naming every bad key, e.g. `GPUHERD_SANDBOX_TIME_SCALE`, on
    one line. The data directory is created here (see the module docstring)."""
    toml_path = home_from_env() / CONFIG_FILE
    if toml_path.exists() and not toml_path.is_file():
        raise ConfigError(f"{clip(str(toml_path), 200)} is not a file (a directory?): gpuherd reads its settings "
                          f"from it; remove it or make it a TOML file. The data directory is {ENV_PREFIX}HOME.")
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "?"
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{ENV_PREFIX}{key.upper()} (or `{key}` in {CONFIG_FILE}): {_one_line(msg)}")
        raise ConfigError("Bad configuration: " + "; ".join(problems)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed config.toml
        raise ConfigError(f"Cannot read configuration ({toml_path}): {_one_line(str(exc))}") from None
    _usable_home(settings.home)
    return settings
