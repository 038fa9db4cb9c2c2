from dataclasses import dataclass

import pytest

from prismatic.cli import INTERRUPTED, USAGE_ERROR, run_cli


@dataclass
class _Config:
    n: int = 1


def _run(cfg: _Config) -> None:
    if cfg.n < 0:
        raise ValueError(f"n is {cfg.n}, expected >= 0")
    if cfg.n == 0:
        raise KeyError("not a user error here")
    print(f"ran with n={cfg.n}")


def test_run_cli_parses_flags_and_returns_zero(capsys):
    assert run_cli("tool", _Config, _run, (ValueError,), ["--n", "3"]) == 0
    assert capsys.readouterr().out == "ran with n=3\n"


def test_run_cli_reports_a_user_error_without_traceback(capsys):
    assert run_cli("tool", _Config, _run, (ValueError,), ["--n", "-2"]) == USAGE_ERROR == 2
    err = capsys.readouterr().err
    assert err == "tool: error: n is -2, expected >= 0\n"


def test_run_cli_lets_other_errors_propagate():
    with pytest.raises(KeyError):
        run_cli("tool", _Config, _run, (ValueError,), ["--n", "0"])


def test_run_cli_reports_ctrl_c_in_one_line_and_exits_130(capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    assert run_cli("tool", _Config, interrupted, (ValueError,), []) == INTERRUPTED == 130
    assert capsys.readouterr().err == "tool: interrupted\n"


def test_run_cli_rejects_an_unknown_flag_as_argparse_does():
    with pytest.raises(SystemExit) as e:
        run_cli("tool", _Config, _run, (ValueError,), ["--m", "1"])
    assert e.value.code == 2


@pytest.mark.parametrize("args, says", [
    (["--n", "abc"], "`n`: Couldn't parse 'abc' into an int"),
    (["--config_path", "missing.yaml"], "missing.yaml"),
])
def test_run_cli_reports_an_unparsable_value_without_traceback(capsys, tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    assert run_cli("tool", _Config, _run, (ValueError,), args) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("tool: error: ") and says in err


@pytest.mark.parametrize("text, says", [
    ("- 1\n- 2\n", "must hold a mapping of config fields, found list"),
    ("", "must hold a mapping of config fields, found nothing"),
    ("n: [1\n", "is not valid YAML or JSON"),
])
def test_a_config_file_that_is_not_a_mapping_is_named(capsys, tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for args in (["--config_path", str(path)], [f"--config_path={path}"]):
        assert run_cli("tool", _Config, _run, (ValueError,), args) == USAGE_ERROR
        err = capsys.readouterr().err
        assert err.startswith(f"tool: error: --config_path {path} ") and says in err
    path.write_text("n: 4\n")
    assert run_cli("tool", _Config, _run, (ValueError,), ["--config_path", str(path)]) == 0
    assert capsys.readouterr().out == "ran with n=4\n"


def test_an_output_path_under_a_file_is_named_without_traceback(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")

    def writes(_cfg):
        (blocker / "out").mkdir(parents=True)

    assert run_cli("tool", _Config, writes, (KeyError,), []) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("tool: error: ") and str(blocker) in err and blocker.read_text() == "mine"


def test_check_counts_names_the_first_bad_field():
    from prismatic.cli import check_counts

    cfg = _Config(n=0)
    check_counts(cfg, non_negative=("n",))
    with pytest.raises(ValueError, match=r"--n is 0, expected >= 1"):
        check_counts(cfg, positive=("n",))
