"""Configuration: the minimal file works; bad files stop the agent with a message naming the key."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import AGENT

from llmfleet_agent.config import ConfigError, parse_config, parse_duration

MINIMAL = """
listen: {host: 127.0.0.1, port: 18443}
ollama: {command: [llmfleet-ollama-sim, serve], port: 21434, models: ["tinyllama:latest"]}
store: {url: "sqlite:////tmp/llmfleet-demo/agent.db"}
"""


def test_minimal_config_has_sane_defaults() -> None:
    cfg = parse_config(yaml.safe_load(MINIMAL))
    assert cfg.listen.port == 18443
    assert cfg.ollama.command == ["llmfleet-ollama-sim", "serve"]
    assert cfg.ollama.restart.max_failures >= 1
    assert cfg.ollama.restart.initial_delay <= cfg.ollama.restart.max_delay
    assert cfg.resolved_state_dir == Path("/tmp/llmfleet-demo")
    assert cfg.limits.max_body_bytes > 0
    assert cfg.idle.gpu_activity_threshold is None and cfg.idle.count_logins is False


def test_restart_and_env_are_accepted() -> None:
    cfg = parse_config(
        {
            "ollama": {
                "restart": {"initial_delay": 1, "max_delay": 8, "max_failures": 3},
                "env": {"OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_NUM_PARALLEL": "4"},
            }
        }
    )
    assert cfg.ollama.restart.max_delay == 8
    assert cfg.ollama.env["OLLAMA_NUM_PARALLEL"] == "4"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"listen": {"prot": 1}}, "listen.prot: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"ollama": {"port": 70000}}, "ollama.port"),
        ({"ollama": {"port": 0}}, "ollama.port"),
        ({"listen": {"port": "http"}}, "listen.port"),
        ({"ollama": {"command": "ollama serve"}}, "ollama.command"),
        ({"ollama": {"command": []}}, "ollama.command"),
        ({"ollama": {"restart": {"max_failures": 0}}}, "ollama.restart.max_failures"),
        ({"ollama": {"restart": {"initial_delay": 10, "max_delay": 1}}}, "ollama.restart"),
        ({"ollama": {"env": {"OLLAMA_HOST": "0.0.0.0"}}}, "ollama.env"),
        ({"ollama": {"models": ["bad name!"]}}, "ollama.models"),
        ({"store": {"url": "mysql://db"}}, "store.url"),
        ({"idle": {"gpu_activity_threshold": 150}}, "idle.gpu_activity_threshold"),
        ({"logging": {"level": "loud"}}, "logging.level"),
    ],
)
def test_bad_values_name_the_key(data: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert named in str(err.value)


def test_retention_is_a_duration_or_null() -> None:
    defaults = parse_config({}).store
    assert (defaults.audit_retention, defaults.usage_retention) == (90 * 86400, 400 * 86400)
    cfg = parse_config({"store": {"audit_retention": "2w", "usage_retention": None}}).store
    assert (cfg.audit_retention, cfg.usage_retention) == (14 * 86400, None)
    # the collection's duration language (tests/unit/plugins/filter/test_rules.py): never is no limit
    cfg = parse_config({"store": {"audit_retention": "1.5H", "usage_retention": "never"}}).store
    assert (cfg.audit_retention, cfg.usage_retention) == (5400, None)
    with pytest.raises(ConfigError, match=r"store\.audit_retention: .*greater than 0"):
        parse_config({"store": {"audit_retention": "0s"}})
    with pytest.raises(ConfigError, match=r"store\.usage_retention: .*not a duration"):
        parse_config({"store": {"usage_retention": "a year"}})


def test_durations() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("15m") == 900
    assert parse_duration(12) == 12
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return subprocess.run(
        [AGENT, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30
    )


def test_check_config_accepts_the_minimal_file(tmp_path: Path) -> None:
    res = _check(tmp_path, MINIMAL)
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (MINIMAL + "colour: blue\n", "colour: unknown key"),
        (MINIMAL.replace("port: 21434", "port: 99999"), "ollama.port"),
        (MINIMAL.replace("port: 18443", "port: many"), "listen.port"),
        ("listen: [1, 2]\n", "listen"),
        ("listen: {port: 1\n", "not valid YAML"),
    ],
)
def test_check_config_and_serve_refuse_bad_files(tmp_path: Path, text: str, named: str) -> None:
    res = _check(tmp_path, text)
    assert res.returncode != 0
    assert named in res.stderr
    assert "Traceback" not in res.stderr
    serve = subprocess.run(
        [AGENT, "serve", "--config", str(tmp_path / "agent.yaml")], capture_output=True, text=True, timeout=30
    )
    assert serve.returncode != 0
    assert named in serve.stderr


def test_config_from_environment_variable(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(MINIMAL)
    res = subprocess.run(
        [AGENT, "check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"LLMFLEET_CONFIG": str(path), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    missing = subprocess.run([AGENT, "check-config"], capture_output=True, text=True, timeout=30, env={})
    assert missing.returncode != 0
    assert "LLMFLEET_CONFIG" in missing.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [AGENT, "check-config", "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "nope.yaml: cannot read" in res.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:secret@db.example:5432/llmfleet", "password in store.url is refused"),
        ("postgresql://u@db.example:5432/llmfleet?sslmode=disable", "only for a server on this machine"),
        ("postgresql://u@db.example:5432/llmfleet?sslmode=require", "does not verify the server"),
        ("postgresql://u@db.example:5432/llmfleet?sslmode=prefer", "does not verify the server"),
        ("postgresql://u@db.example:5432/llmfleet?sslmode=verify-ca", "does not verify the server's name"),
        ("postgresql://u@db.example:5432/", "no database name"),
        ("postgresql://db.example:5432/llmfleet", "no user"),
        ("postgresql://u@db.example:5432/llmfleet?sslrootcert=ca.pem", "absolute path"),
        ("postgresql://u@db.example:5432/llmfleet?options=-c%20x", "unknown parameter 'options'"),
        ("mysql://u@db.example/llmfleet", "use sqlite:////"),
    ],
)
def test_store_urls_that_are_refused_say_why(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"store": {"url": url}})


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://llmfleet_agent@db.abc.us-east-1.rds.amazonaws.com:5432/llmfleet?sslrootcert=/etc/llmfleet/rds-ca.pem",
        "postgres://u@db.example/llmfleet?sslmode=verify-full&sslrootcert=/ca.pem",
        "postgresql://u@127.0.0.1:5433/llmfleet?sslmode=disable",
    ],
)
def test_store_urls_that_are_accepted(url: str) -> None:
    assert parse_config({"store": {"url": url}}).store.url == url


@pytest.mark.parametrize(
    ("doc", "least"),
    [("agent.md", 2), ("directory.md", 1), ("budgets.md", 1), ("gateway.md", 1)],
)
def test_the_configuration_examples_in_the_docs_are_valid(doc: str, least: int) -> None:
    """Every YAML example of these docs is a configuration the agent accepts."""
    text = (Path(__file__).resolve().parents[2] / "docs" / doc).read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= least
    for block in blocks:
        parse_config(yaml.safe_load(block), f"docs/{doc}")


def test_the_gateways_sweep_takes_a_threshold_as_a_duration_or_seconds(tmp_path: Path) -> None:
    """The host stage writes llmfleet_idle_after as it is given: 30m, or a number of seconds."""
    key = tmp_path / "gateway-key"
    for value in ("30m", 900, 1.5, "never"):
        cfg = parse_config(
            {
                "gateway": {
                    "key_file": str(key),
                    "deployment": "acme",
                    "agent_scheme": "http",
                    "sweep": {"default_idle_after": value},
                }
            }
        )
        assert cfg.gateway is not None and cfg.gateway.sweep.default_idle_after == value
    with pytest.raises(ConfigError, match=r"gateway\.sweep\.default_idle_after.*'1\.5x' is not a duration"):
        parse_config(
            {
                "gateway": {
                    "key_file": str(key),
                    "deployment": "acme",
                    "agent_scheme": "http",
                    "sweep": {"default_idle_after": "1.5x"},
                }
            }
        )
