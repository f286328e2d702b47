"""Templates: built-ins per SPEC §5, boot-time overrides, durations, the TOML catalog, secrets."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from gpuherd.core.errors import ConfigError, InvalidInput, NotFound
from gpuherd.core.offers import Offer
from gpuherd.core.providers.base import CreateRequest
from gpuherd.core.templates import (
    OVERRIDE_SCHEMA,
    Template,
    TemplateCatalog,
    apply_overrides,
    format_duration,
    override_schema,
    parse_duration,
    validate_overrides,
)


@pytest.fixture
def catalog() -> TemplateCatalog:
    return TemplateCatalog.load(None)


@pytest.fixture
def budget(catalog: TemplateCatalog) -> Template:
    return catalog.get("budget")


def devbox() -> Template:
    return Template(name="devbox", image="pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime",
                    ports=[8888], health_path=None, min_gpu_ram=16)


# ---- built-ins --------------------------------------------------------------------------

SPEC_TABLE = {
    # name: (model family, min GPU RAM, GPUs, max $/h)
    "budget": ("Qwen2.5-Coder-7B-Instruct", 8, 1, Decimal("0.50")),
    "research": ("Qwen2.5-Coder-14B-Instruct", 16, 1, Decimal("1.00")),
    "high_performance": ("Qwen2.5-Coder-32B-Instruct", 24, 1, Decimal("2.00")),
    "llava-34b": ("llava-v1.6-34b", 24, 4, None),
    "llama-3.1-70b": ("Llama-3.1-70B-Instruct", 24, 2, None),
}


def test_builtins_are_the_spec_table_in_order(catalog: TemplateCatalog) -> None:
    assert catalog.names() == list(SPEC_TABLE)


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_builtin_matches_spec(catalog: TemplateCatalog, name: str) -> None:
    family, ram, gpus, max_dph = SPEC_TABLE[name]
    t = catalog.get(name)
    assert t.min_gpu_ram == ram
    assert t.num_gpus == gpus
    assert t.max_dph == max_dph
    if max_dph is not None:
        assert isinstance(t.max_dph, Decimal)
    assert t.model is not None and family.lower() in t.model.lower().replace("meta-llama-", "llama-")
    assert t.image.startswith("vllm/vllm-openai")
    assert t.ports == [8000] and t.health_path == "/health" and t.health_port == 8000
    assert 40 <= t.disk_gb <= 200
    assert t.idle_minutes == 30 and t.warn_minutes == 5 and t.idle_action == "stop"
    assert t.source == "builtin"
    args = t.vllm_args()
    assert args[:2] == ["--model", t.model]
    assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)


def test_high_performance_context_is_8192(catalog: TemplateCatalog) -> None:
    t = catalog.get("high_performance")
    assert t.max_model_len == 8192
    assert "--max-model-len 8192" in t.start_command()


def test_llama_70b_is_tensor_parallel_2(catalog: TemplateCatalog) -> None:
    t = catalog.get("llama-3.1-70b")
    assert t.effective_tensor_parallel_size == 2
    cmd = t.start_command()
    assert cmd.startswith("python3 -m vllm.entrypoints.openai.api_server --model ")
    assert "--tensor-parallel-size 2" in cmd


def test_create_fields_fill_a_create_request(budget: Template) -> None:
    fields = budget.to_create_fields()
    req = CreateRequest(offer_id="o1", label="k1", **fields)
    assert req.image == budget.image
    assert req.command is None                    # the vllm-openai entrypoint is the server
    assert req.args == budget.vllm_args() and "--model" in req.args
    assert req.health_path == "/health" and req.health_port == 8000
    assert req.disk_gb == budget.disk_gb


def test_command_template_gives_a_command_and_no_vllm_args() -> None:
    t = Template(name="jup", image="jupyter/base-notebook:latest", command="start-notebook.sh",
                 extra_args=["--NotebookApp.token=", "--port=8888"], ports=[8888],
                 health_path="/api")
    fields = t.to_create_fields()
    assert fields["command"] == "start-notebook.sh --NotebookApp.token= --port=8888"
    assert fields["args"] == []
    assert fields["health_port"] == 8888


def test_template_rules() -> None:
    with pytest.raises(ValueError, match="either command or model"):
        Template(name="x", image="vllm/vllm-openai:latest", model="a/b", command="run")
    with pytest.raises(ValueError, match="--max-model-len is set by the max_model_len field"):
        Template(name="x", image="vllm/vllm-openai:latest", model="a/b",
                 extra_args=["--max-model-len=4096"])
    with pytest.raises(ValueError, match="health_port 9000 is not one of ports"):
        Template(name="x", image="vllm/vllm-openai:latest", model="a/b", health_port=9000)
    with pytest.raises(ValueError, match="warn_minutes"):
        Template(name="x", image="vllm/vllm-openai:latest", idle_minutes=5, warn_minutes=5)


def test_offer_fit(budget: Template) -> None:
    def offer(**kw) -> Offer:
        base = dict(provider="sandbox", offer_id="1", gpu_name="RTX 3070", num_gpus=1,
                    gpu_ram=7.99, dph=Decimal("0.12"))
        return Offer(**{**base, **kw})

    assert budget.fits(offer())                                  # 7.99 GB counts as 8
    assert "GB per GPU" in budget.offer_rejection(offer(gpu_ram=6))
    assert "GPUs" in budget.offer_rejection(offer(num_gpus=2))
    assert not budget.fits(offer(dph=Decimal("0.51")))
    assert budget.fits(offer(dph=Decimal("0.51")), check_price=False)
    only_runpod = Template.model_validate({**budget.model_dump(), "providers": ["RunPod"]})
    assert only_runpod.providers == ["runpod"]
    assert "provider" in only_runpod.offer_rejection(offer())


# ---- overrides --------------------------------------------------------------------------

def test_good_overrides_are_parsed_to_types(budget: Template) -> None:
    effective, clean = apply_overrides(budget, {
        "max_model_len": "4096", "gpu_memory_utilization": "0.85", "max_dph": "$0.75/h",
        "idle": "1h30m", "warn": "10m", "idle_action": "DESTROY", "max_lifetime": "12h",
        "disk": "100GB", "dtype": "bfloat16", "quantization": "none",
        "env.HF_HOME": "/workspace/hf", "image": "vllm/vllm-openai:v0.6.4",
    })
    assert clean == {
        "max_model_len": 4096, "gpu_memory_utilization": 0.85, "max_dph": Decimal("0.75"),
        "idle": timedelta(minutes=90), "warn": timedelta(minutes=10), "idle_action": "destroy",
        "max_lifetime": timedelta(hours=12), "disk_gb": 100, "dtype": "bfloat16",
        "quantization": None, "env.HF_HOME": "/workspace/hf", "image": "vllm/vllm-openai:v0.6.4",
    }
    assert isinstance(clean["max_dph"], Decimal)
    assert effective.max_model_len == 4096 and effective.max_dph == Decimal("0.75")
    assert effective.idle_minutes == 90 and effective.warn_minutes == 10
    assert effective.max_lifetime == timedelta(hours=12) and effective.disk_gb == 100
    assert effective.env == {"HF_HOME": "/workspace/hf"}
    assert "--max-model-len 4096" in effective.start_command()
    assert "--dtype bfloat16" in effective.start_command()


def test_overrides_never_change_the_input_template(budget: Template) -> None:
    before = budget.model_dump()
    effective, _ = apply_overrides(budget, {"max_model_len": "4096", "env.X": "1", "idle": "2h"})
    assert budget.model_dump() == before
    assert budget.env == {} and budget.max_model_len != 4096
    assert effective is not budget and effective.env == {"X": "1"}


def test_unknown_key_is_named_with_a_suggestion(budget: Template) -> None:
    with pytest.raises(InvalidInput) as exc:
        apply_overrides(budget, {"max_len": "4096"})
    assert exc.value.message == \
        "Template 'budget' has no setting 'max_len' (did you mean max_model_len?)"


def test_unknown_key_without_a_close_match_lists_settings(budget: Template) -> None:
    with pytest.raises(InvalidInput, match="no setting 'colour'.*max_model_len"):
        apply_overrides(budget, {"colour": "red"})


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("max_model_len", "abc",
     "max_model_len must be a whole number between 256 and 262144, got 'abc'"),
    ("max_model_len", "100", "max_model_len must be a whole number between 256 and 262144, got '100'"),
    ("max_model_len", "4096.5", "got '4096.5'"),
    ("gpu_memory_utilization", "1.5", "gpu_memory_utilization must be a number between 0.1 and 0.99"),
    ("tensor_parallel_size", "0", "tensor_parallel_size must be a whole number between 1 and 16"),
    ("num_gpus", "two", "num_gpus must be a whole number between 1 and 16, got 'two'"),
    ("disk", "5", "disk_gb must be a whole number of GB between 10 and 2000, got '5'"),
    ("max_dph", "-1", "max_dph must be an amount in USD/hour above 0 and at most 1000, got '-1'"),
    ("max_dph", "cheap", "got 'cheap'"),
    ("idle", "forever", "idle must be a duration between 1m and 7d"),
    ("idle", "-5m", "got '-5m'"),
    ("idle", "30s", "got '30s'"),
    ("idle", "8d", "got '8d'"),
    ("warn", "2d", "warn must be a duration between 0m and 1d"),
    ("idle_action", "explode", "idle_action must be one of stop, destroy, got 'explode'"),
    ("dtype", "int3", "dtype must be one of auto, half, float16, bfloat16, float32, got 'int3'"),
    ("quantization", "bnb", "quantization must be one of none, awq, gptq, fp8, got 'bnb'"),
    ("model", "not a repo", "model must be a Hugging Face model id"),
    ("image", "Not An Image!", "image must be a container image"),
    ("min_gpu_ram", "lots", "min_gpu_ram must be a whole number of GB between 1 and 1024, got 'lots'"),
])
def test_bad_values_are_named(budget: Template, key: str, value: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        apply_overrides(budget, {key: value})
    assert expected in exc.value.message


def test_env_override_names_and_secrets(budget: Template) -> None:
    with pytest.raises(InvalidInput, match=r"'1BAD' is not a valid environment variable name"):
        apply_overrides(budget, {"env.1BAD": "x"})
    with pytest.raises(InvalidInput) as exc:
        apply_overrides(budget, {"env.HF_TOKEN": "hf_secret\nmore"})
    assert "hf_secret" not in exc.value.message and "env.HF_TOKEN" in exc.value.message
    checked = validate_overrides(budget, {"env.HF_TOKEN": "hf_secret"})
    assert checked.template.env["HF_TOKEN"] == "hf_secret"
    assert checked.as_json() == {"env.HF_TOKEN": "••••"}
    assert "hf_secret" not in checked.describe()


def test_several_problems_are_reported_together(budget: Template) -> None:
    with pytest.raises(InvalidInput) as exc:
        apply_overrides(budget, {"max_model_len": "x", "idle": "forever"})
    assert exc.value.message.startswith("2 problems")
    assert "max_model_len" in exc.value.message and "'forever'" in exc.value.message


def test_vllm_setting_on_a_non_vllm_template_is_refused() -> None:
    with pytest.raises(InvalidInput, match="max_model_len is a vLLM setting; template 'devbox'"):
        apply_overrides(devbox(), {"max_model_len": "4096"})
    effective, _ = apply_overrides(devbox(), {"disk": "200", "idle": "2h"})
    assert effective.disk_gb == 200
    assert "max_model_len" not in {s.key for s in override_schema(devbox())}


def test_cross_field_checks(budget: Template, catalog: TemplateCatalog) -> None:
    with pytest.raises(InvalidInput, match="tensor_parallel_size=2 needs 2 GPUs.*num_gpus=2"):
        apply_overrides(budget, {"tensor_parallel_size": "2"})
    effective, _ = apply_overrides(budget, {"tensor_parallel_size": "2", "num_gpus": "2"})
    assert "--tensor-parallel-size 2" in effective.start_command()
    # tensor parallelism follows num_gpus when the template does not pin it
    effective, _ = apply_overrides(catalog.get("llama-3.1-70b"), {"num_gpus": "4"})
    assert effective.effective_tensor_parallel_size == 4
    with pytest.raises(InvalidInput, match=r"warn \(10m\) must be shorter than idle \(5m\)"):
        apply_overrides(budget, {"idle": "5m", "warn": "10m"})
    checked = validate_overrides(budget, {"idle": "4m"})   # template warns 5m ahead
    assert checked.template.warn_minutes == 2 and checked.notes


def test_alias_given_twice_is_refused(budget: Template) -> None:
    with pytest.raises(InvalidInput, match="disk and disk_gb both set disk_gb"):
        apply_overrides(budget, {"disk": "50", "disk_gb": "60"})


def test_keys_forgive_case_and_dashes_and_accept_api_types(budget: Template) -> None:
    _, clean = apply_overrides(budget, {"Max-Model-Len": 4096, "max_dph": 0.3, "gpus": 1})
    assert clean == {"max_model_len": 4096, "max_dph": Decimal("0.3"), "num_gpus": 1}


def test_as_json_round_trips(budget: Template) -> None:
    first = validate_overrides(budget, {"idle": "1h30m", "max_dph": "0.45", "max_model_len": "2048"})
    again = validate_overrides(budget, first.as_json())
    assert again.values == first.values
    assert first.as_json()["idle"] == "1h30m"


def test_schema_is_one_table_with_help() -> None:
    expected = {"max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "model",
                "disk_gb", "num_gpus", "min_gpu_ram", "max_dph", "idle", "warn", "idle_action",
                "max_lifetime", "image", "env.NAME", "dtype", "quantization"}
    assert set(OVERRIDE_SCHEMA) == expected
    for spec in OVERRIDE_SCHEMA.values():
        assert spec.expects and spec.help and spec.example.split("=")[0].startswith(
            spec.key.split(".")[0])


# ---- durations --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("45m", timedelta(minutes=45)), ("2h", timedelta(hours=2)), ("1h30m", timedelta(minutes=90)),
    ("1h 30m", timedelta(minutes=90)), ("90s", timedelta(seconds=90)), ("1d", timedelta(days=1)),
    ("30", timedelta(minutes=30)), ("1.5h", timedelta(minutes=90)), ("2 hours", timedelta(hours=2)),
    (" 10 MIN ", timedelta(minutes=10)),
])
def test_parse_duration_good(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("forever", "'forever' is not a duration"),
    ("-5m", "'-5m' is not a valid duration: it cannot be negative"),
    ("0m", "'0m' is too short"),
    ("", "got nothing"),
    ("   ", "got nothing"),
    ("400d", "'400d' is too long"),
    ("5 fortnights", "unknown unit"),
    ("1h30", "needs a unit"),
    ("1h1h", "twice"),
    ("m", "'m' is not a duration"),
])
def test_parse_duration_bad(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_duration(text)
    assert fragment in exc.value.message


def test_parse_duration_zero_when_allowed() -> None:
    assert parse_duration("0m", allow_zero=True) == timedelta(0)
    with pytest.raises(InvalidInput, match="too long"):
        parse_duration("2h", maximum=timedelta(hours=1))


@pytest.mark.parametrize(("td", "text"), [
    (timedelta(minutes=90), "1h 30m"), (timedelta(minutes=45), "45m"),
    (timedelta(days=2, hours=3), "2d 3h"), (timedelta(seconds=90), "1m 30s"),
    (timedelta(0), "0s"), (timedelta(minutes=-5), "-5m"),
])
def test_format_duration(td: timedelta, text: str) -> None:
    assert format_duration(td) == text
    if td > timedelta(0):
        assert parse_duration(text) == td


# ---- the TOML catalog -------------------------------------------------------------------

GOOD_TOML = """
[templates.devbox]
description = "Jupyter on a 4090"
image = "jupyter/base-notebook:latest"
command = "start-notebook.sh"
ports = [8888]
health_path = "/api"
min_gpu_ram = 24
max_dph = 0.7
providers = ["vast", "RunPod"]
idle_minutes = "45m"
warn_minutes = 10
idle_action = "destroy"
max_lifetime_hours = "1d"
destroy_after_stopped_days = 3
env = { JUPYTER_TOKEN = "s3cret", TZ = "UTC" }

[templates.long-budget]
extends = "budget"
description = "budget with a longer context"
max_model_len = 16384
env = { HF_TOKEN = "hf_abc" }

[templates.longer]
extends = "long-budget"
idle_minutes = 60
env = { EXTRA = "1" }

[templates.budget]
extends = "budget"
max_dph = "0.40"

[templates.research-8k]
extends = "research"
max_model_len = 8192
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "templates.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_means_builtins_only(tmp_path: Path) -> None:
    catalog = TemplateCatalog.load(tmp_path / "nope.toml")
    assert catalog.names() == list(SPEC_TABLE) and catalog.notes == []


def test_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    catalog = TemplateCatalog.load(path)
    assert catalog.names() == [*SPEC_TABLE, "devbox", "long-budget", "longer", "research-8k"]
    dev = catalog.get("devbox")
    assert dev.max_dph == Decimal("0.7") and isinstance(dev.max_dph, Decimal)
    assert dev.providers == ["vast", "runpod"]
    assert dev.idle_minutes == 45 and dev.warn_minutes == 10 and dev.idle_action == "destroy"
    assert dev.max_lifetime == timedelta(days=1)
    assert dev.destroy_after_stopped == timedelta(days=3)
    assert dev.health_port == 8888 and dev.start_command() == "start-notebook.sh"
    assert dev.source == str(path)


def test_extends_inherits_and_merges_env(tmp_path: Path, catalog: TemplateCatalog) -> None:
    loaded = TemplateCatalog.load(write(tmp_path, GOOD_TOML))
    base = catalog.get("budget")
    child = loaded.get("long-budget")
    assert child.model == base.model and child.image == base.image
    assert child.min_gpu_ram == 8
    assert child.max_dph == Decimal("0.40")   # "budget" here is the file's, which replaces the built-in
    assert child.max_model_len == 16384 and child.extends == "budget"
    research = loaded.get("research-8k")
    assert research.max_model_len == 8192 and research.max_dph == Decimal("1.00")
    assert research.model == catalog.get("research").model and not research.replaces_builtin
    grandchild = loaded.get("longer")
    assert grandchild.max_model_len == 16384 and grandchild.idle_minutes == 60
    assert grandchild.env == {"HF_TOKEN": "hf_abc", "EXTRA": "1"}


def test_file_template_replaces_builtin_with_a_note(tmp_path: Path) -> None:
    loaded = TemplateCatalog.load(write(tmp_path, GOOD_TOML))
    replaced = loaded.get("budget")
    assert replaced.max_dph == Decimal("0.40") and replaced.replaces_builtin
    assert replaced.model is not None and "7B" in replaced.model   # extended the built-in
    assert any("'budget' replaces the built-in" in note for note in loaded.notes)
    assert loaded.names().index("budget") == 0


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[templates.mine]\nimage = "x"\nmin_gpu_ram = = 3\n')
    with pytest.raises(ConfigError) as exc:
        TemplateCatalog.load(path)
    assert str(path) in exc.value.message and "line 3" in exc.value.message


def test_bad_field_names_file_template_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, '[templates.mine]\nimage = "vllm/vllm-openai:latest"\n'
                           'min_gpu_ram = "lots"\n')
    with pytest.raises(ConfigError) as exc:
        TemplateCatalog.load(path)
    assert exc.value.message.startswith(
        f"{path}: template 'mine': min_gpu_ram: Input should be a valid number")


@pytest.mark.parametrize(("body", "fragment"), [
    ('[templates.mine]\nimage = "a/b"\nmin_gpu_ram_gb = 3\n',
     "template 'mine': min_gpu_ram_gb: unknown field (did you mean min_gpu_ram?)"),
    ('[templates.mine]\nextends = "budgte"\n',
     "template 'mine': extends: unknown template 'budgte' (did you mean budget?)"),
    ('[templates.a]\nextends = "b"\n[templates.b]\nextends = "a"\n', "extends: a cycle"),
    ('[templates.mine]\nextends = "budget"\nidle_minutes = "forever"\n',
     "template 'mine': idle_minutes: 'forever' is not a duration"),
    ('[templates.mine]\nextends = "budget"\nsource = "x"\n', "source: set by gpuherd"),
    ('[templates."My Box"]\nimage = "a/b"\n', "template 'My Box': a template name is"),
    ('[templates.mine]\nimage = "a/b"\nmodel = "x/y"\ncommand = "run"\n',
     "template 'mine': set either command or model"),
    ('[templates.mine]\nextends = "budget"\nenv = { "BAD-NAME" = "1" }\n',
     "template 'mine': env: 'BAD-NAME' is not a valid environment variable name"),
    ('title = "x"\n', "unknown top-level key 'title'"),
])
def test_bad_files_are_named(tmp_path: Path, body: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        TemplateCatalog.load(write(tmp_path, body))
    assert fragment in exc.value.message


def test_unknown_template_lists_templates_and_suggests(catalog: TemplateCatalog) -> None:
    with pytest.raises(NotFound) as exc:
        catalog.get("reserch")
    assert exc.value.message == (
        "Unknown template 'reserch' (did you mean research?). Templates: budget, research, "
        "high_performance, llava-34b, llama-3.1-70b")
    assert catalog.get("High-Performance").name == "high_performance"
    assert "budget" in catalog and "nope" not in catalog


# ---- secrets ----------------------------------------------------------------------------

def test_public_env_masks_secret_looking_values() -> None:
    t = Template(name="x", image="a/b", env={
        "HF_TOKEN": "hf_abc", "WANDB_API_KEY": "k", "DB_PASSWORD": "p", "AWS_SECRET": "s",
        "HF_HOME": "/hf", "EMPTY_TOKEN": ""})
    assert t.public_env() == {
        "HF_TOKEN": "••••", "WANDB_API_KEY": "••••", "DB_PASSWORD": "••••", "AWS_SECRET": "••••",
        "HF_HOME": "/hf", "EMPTY_TOKEN": ""}
    assert t.env["HF_TOKEN"] == "hf_abc"                    # the real value is kept for the boot
    assert "hf_abc" not in repr(t)
    assert t.public_dict()["env"]["HF_TOKEN"] == "••••"
