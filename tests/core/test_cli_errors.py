"""The CLI's promises: exit 0 ok, 1 only for a failed verification, 2 for usage and input
errors, 3 for an internal error; one line on stderr and never a traceback without --debug."""

import numpy as np
import pytest
import torch

from sdk.cli import main

X = torch.randn(2, 1, 8, 8)      # a batch of 2: verify --inputs must cut .npz samples into pairs


@pytest.fixture
def pt2(small_cnn, tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(small_cnn, (X,)), path)
    return path


@pytest.fixture
def art(example_plugin, pt2, tmp_path):
    out = tmp_path / "art"
    assert main(["deploy", str(pt2), "--target", "torch-ir", "-o", str(out)]) == 0
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    return code, cap.err


def one_line(err):
    return err.count("\n") == 1


# -- deploy ---------------------------------------------------------------------------------

def test_bad_yaml_option_value(capsys, example_plugin, pt2, tmp_path):
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-O", "io=[", "-o", tmp_path / "o")
    assert code == 2 and "InputError" in err and "not valid YAML" in err and one_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("item, match", [("io", "not KEY=VALUE"), ("=3", "not KEY=VALUE"),
                                         ("target=arm-int8", "not a target option"),
                                         ("overwrite=true", "not a target option"),
                                         ("bogus=1", "bogus")])
def test_bad_option_names(capsys, example_plugin, pt2, tmp_path, item, match):
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-O", item, "-o", tmp_path / "o")
    assert code == 2 and match in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text", ["version: abc\nstages: []\n", "version: [1]\n", "stages: 5\n",
                                  "stages: [{method: ptq, config: 3}]\n", ": : :\n"])
def test_bad_recipe_file(capsys, example_plugin, pt2, tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-r", recipe, "-o", tmp_path / "o")
    assert code == 2 and ("RecipeError" in err or "ConfigError" in err)
    assert not (tmp_path / "o").exists()


def test_missing_files_and_bad_batch_size(capsys, example_plugin, pt2, tmp_path):
    code, err = run(capsys, "deploy", tmp_path / "none.pt2", "--target", "torch-ir", "-o", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-c", tmp_path / "none.npz", "-o", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-r", tmp_path / "none.yaml", "-o", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "--batch-size", "0", "-o", tmp_path / "o")
    assert code == 2 and "--batch-size" in err
    code, err = run(capsys, "deploy", pt2, "--target", "nope", "-o", tmp_path / "o")
    assert code == 2 and "unknown target" in err
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    code, err = run(capsys, "deploy", tmp_path / "junk.pt2", "--target", "torch-ir", "-o", tmp_path / "o")
    assert code == 2 and "InputError" in err and one_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["empty", "object", "scalar", "two-arrays", "not-npz"])
def test_bad_calibration_npz(capsys, example_plugin, pt2, tmp_path, case):
    path = tmp_path / "cal.npz"
    if case == "empty":
        np.savez(path)
    elif case == "object":
        np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    elif case == "scalar":
        np.savez(path, x=np.float32(3))
    elif case == "two-arrays":
        np.savez(path, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros((4, 1, 8, 8), np.float32))
    else:
        path.write_bytes(b"PK\x03\x04 garbage")
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-c", path, "-o", tmp_path / "o",
                    "-r", _ptq(tmp_path))
    assert code == 2 and "InputError" in err and one_line(err)
    assert not (tmp_path / "o").exists()


def _ptq(tmp_path):
    r = tmp_path / "ptq.yaml"
    r.write_text("stages: [{method: ptq}]\n")
    return r


def test_existing_artifact_needs_force(capsys, art, pt2):
    before = (art / "manifest.json").read_bytes()
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-o", art)
    assert code == 2 and "ArtifactError" in err and "overwrite" in err
    assert (art / "manifest.json").read_bytes() == before
    code, err = run(capsys, "deploy", pt2, "--target", "torch-ir", "-o", art, "--force")
    assert code == 0, err


def test_pickled_pt2_is_refused_without_trust(capsys, example_plugin, tmp_path):
    from test_pt2_safety import evil_pt2

    marker = tmp_path / "PWNED"
    path = evil_pt2(tmp_path, marker, where="weight")
    code, err = run(capsys, "deploy", path, "--target", "torch-ir", "-o", tmp_path / "o")
    assert code == 2 and "--trust-pickle" in err and "use_pickle" in err and one_line(err)
    assert not marker.exists() and not (tmp_path / "o").exists()


# -- verify / inspect / sign ------------------------------------------------------------------

def test_verify_unknown_runner_is_a_usage_error(capsys, art):
    code, err = run(capsys, "verify", art, "--runner", "nope")
    assert code == 2 and "unknown runner" in err and "host" in err and one_line(err)


def test_verify_runner_that_cannot_run_here_is_not_a_failed_verification(capsys, art, monkeypatch):
    import sdk.plugins

    cls = sdk.plugins.get_runner("host", "torch-ir")
    monkeypatch.setattr(cls, "unavailable", lambda self: "needs a frobnicator (apt-get install frob)")
    code, err = run(capsys, "verify", art, "--runner", "host")
    assert code == 2 and "ToolchainError" in err and "frobnicator" in err


@pytest.mark.parametrize("case", ["empty", "indivisible", "wrong-shape", "two-arrays", "zero-samples"])
def test_verify_bad_inputs_npz(capsys, art, tmp_path, case):
    path = tmp_path / "in.npz"
    arrays = {"empty": {}, "indivisible": {"x": np.zeros((3, 1, 8, 8), np.float32)},
              "wrong-shape": {"x": np.zeros((2, 1, 9, 9), np.float32)},
              "two-arrays": {"x": np.zeros((2, 1, 8, 8), np.float32), "y": np.zeros((2, 1, 8, 8), np.float32)},
              "zero-samples": {"x": np.zeros((0, 1, 8, 8), np.float32)}}[case]
    np.savez(path, **arrays)
    code, err = run(capsys, "verify", art, "--inputs", path)
    assert code == 2 and "InputError" in err and one_line(err)


def test_verify_inputs_npz_of_a_multiple_of_the_batch(capsys, art, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32))
    code, err = run(capsys, "verify", art, "--inputs", tmp_path / "in.npz")
    assert code == 0, err


def test_sign_and_check_with_a_key(capsys, art, tmp_path):
    key, other = tmp_path / "team.key", tmp_path / "other.key"
    key.write_bytes(b"k" * 32)
    other.write_bytes(b"o" * 32)
    code, err = run(capsys, "verify", art, "--key", key)           # unsigned: refused when a key is given
    assert code == 2 and one_line(err)
    code, err = run(capsys, "sign", art, "--key", key)
    assert code == 0, err
    code, err = run(capsys, "verify", art, "--key", key)
    assert code == 0, err
    code, err = run(capsys, "inspect", art, "--key", key)
    assert code == 0, err
    code, err = run(capsys, "verify", art, "--key", other)
    assert code == 2 and "ArtifactError" in err and one_line(err)
    code, err = run(capsys, "inspect", art, "--key", tmp_path / "missing.key")
    assert code == 2 and "key file" in err


# -- the top level --------------------------------------------------------------------------

def test_internal_error_is_one_line_exit_3_and_debug_shows_it(capsys, monkeypatch):
    import sdk.cli as cli

    def boom(args):
        raise KeyError("surprise")

    monkeypatch.setitem(cli._COMMANDS, "plugins", boom)
    code, err = run(capsys, "plugins")
    assert code == 3 and "internal error" in err and "--debug" in err and one_line(err)
    with pytest.raises(KeyError):
        main(["--debug", "plugins"])


def test_usage_errors_and_help_return_codes(capsys):
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "deploy")[0] == 2
    assert main(["--help"]) == 0
