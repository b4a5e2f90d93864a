import logging

import pytest
from kata_agent import config
from kata_agent.config import AgentConfig, Channel, ConfigError


def test_defaults_without_agent_options() -> None:
    cfg = config.from_cmdline("console=ttyS0 root=/dev/vda1 quiet")
    assert cfg == AgentConfig()
    assert cfg.channel == Channel("serial")


def test_kata_options_are_applied() -> None:
    cfg = config.from_cmdline(
        "quiet agent.log=debug agent.use_vsock=true agent.debug_console "
        "agent.hotplug_timeout=5s agent.container_pipe_size=65536 agent.debug_console_vport=1026"
    )
    assert cfg.log_level == logging.DEBUG
    assert cfg.channel == Channel("vsock", port=1024)
    assert cfg.debug_console is True
    assert cfg.debug_console_vport == 1026
    assert cfg.hotplug_timeout == 5.0
    assert cfg.container_pipe_size == 65536


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("3", 3.0), ("2m", 120.0), ("1.5s", 1.5)]
)
def test_hotplug_timeout_durations(text: str, seconds: float) -> None:
    assert config.from_cmdline(f"agent.hotplug_timeout={text}").hotplug_timeout == seconds


def test_unknown_and_bad_options_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kata_agent.config"):
        cfg = config.from_cmdline(
            "agent.frobnicate=1 agent.log=loud agent.container_pipe_size=-4 agent.use_vsock=maybe"
        )
    assert cfg == AgentConfig()
    text = caplog.text
    assert "option=agent.frobnicate" in text
    assert "option=agent.log" in text
    assert "option=agent.container_pipe_size" in text
    assert "option=agent.use_vsock" in text


def test_pipe_size_is_bounded() -> None:
    assert config.from_cmdline("agent.container_pipe_size=99999999").container_pipe_size == 0


def test_words_after_double_dash_belong_to_init() -> None:
    assert config.from_cmdline("quiet -- agent.log=debug").log_level == logging.INFO


def test_quoted_words() -> None:
    assert config.split_cmdline('a "b c" d="e f"  ') == ["a", "b c", "d=e f"]


@pytest.mark.parametrize(
    ("text", "channel"),
    [
        ("serial", Channel("serial")),
        ("serial:/dev/pts/3", Channel("serial", path="/dev/pts/3")),
        ("vsock", Channel("vsock", port=1024)),
        ("vsock:2000", Channel("vsock", port=2000)),
        ("unix-serial:/tmp/a.sock", Channel("unix-serial", path="/tmp/a.sock")),
        ("unix:/tmp/b.sock", Channel("unix", path="/tmp/b.sock")),
    ],
)
def test_parse_channel(text: str, channel: Channel) -> None:
    assert config.parse_channel(text) == channel


@pytest.mark.parametrize("text", ["tcp:1", "vsock:abc", "vsock:0", "unix:", "unix-serial"])
def test_parse_channel_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        config.parse_channel(text)


def test_flags_override_cmdline() -> None:
    cfg = config.from_cmdline("agent.use_vsock=true agent.log=debug")
    cfg = config.with_overrides(cfg, [("channel", Channel("unix", path="/x")), ("log_level", None)])
    assert cfg.channel == Channel("unix", path="/x")
    assert cfg.log_level == logging.DEBUG


def test_policy_path_from_cmdline_must_be_absolute() -> None:
    assert config.from_cmdline("agent.policy=/etc/kata/policy.json").policy == (
        "/etc/kata/policy.json"
    )
    assert config.from_cmdline("agent.policy=relative.json").policy == ""
