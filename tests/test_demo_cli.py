"""himae-demo's arguments and its check of a --real folder (the runs themselves are the README's, not tests)."""

import pytest

from launch.demo import main as demo_main
from launch.demo_real import PRACTITIONER_BAR, REAL


def test_real_names_what_is_missing_and_how_to_get_it(tmp_path, capsys):
    (tmp_path / "bidmc").mkdir()
    (tmp_path / "bidmc" / "bidmc01.hea").write_text("bidmc01 1 125 10\n")
    with pytest.raises(SystemExit) as e:
        demo_main(["--real", str(tmp_path), "--workdir", str(tmp_path / "w")])
    msg = str(e.value.code)
    assert f"{tmp_path / 'mitdb'}/ with PhysioNet's mitdb records" in msg and "wfdb.dl_database('mitdb'" in msg
    assert not (tmp_path / "w").exists()  # nothing was run


@pytest.mark.parametrize("argv, says", [
    (["--real", "x", "--full"], "--real and --full are two different runs"),
    (["--rate", "50"], "--rate and --stride-s go with --real"),
    (["--real", "x", "--scale", "0.5"], "--scale and --pretrain-scale size the synthetic cohorts"),
])
def test_flags_that_do_not_go_together(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        demo_main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_the_real_recipe_is_the_documented_one():
    assert (REAL["rate"], REAL["stride_s"], REAL["lr"], REAL["minirocket_kernels"]) == (100.0, 2.0, 1e-3, 10_000)
    assert REAL["rate"] in PRACTITIONER_BAR
