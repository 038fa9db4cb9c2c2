from dataclasses import dataclass

import pytest

from prismatic.cli import USAGE_ERROR, run_cli


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


def test_check_counts_names_the_first_bad_field():
    from prismatic.cli import check_counts

    cfg = _Config(n=0)
    check_counts(cfg, non_negative=("n",))
    with pytest.raises(ValueError, match=r"--n is 0, expected >= 1"):
        check_counts(cfg, positive=("n",))
