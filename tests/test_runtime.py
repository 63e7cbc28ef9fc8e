"""Device choice, seeding and the scale switch."""

import logging
import pytest
import torch

from effref import runtime
from effref.runtime import SCALES, get_device, get_scale, progress_bar, seed_everything


def test_default_device_on_this_machine_is_the_best_available(monkeypatch):
    monkeypatch.delenv("EFFREF_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert get_device().type == expected


def test_device_override_from_environment(monkeypatch):
    monkeypatch.setenv("EFFREF_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_missing_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        get_device("cuda")


def test_seed_everything_makes_draws_repeat():
    seed_everything(7)
    a = torch.randn(5), torch.rand(3, generator=seed_everything(7))
    seed_everything(7)
    b = torch.randn(5), torch.rand(3, generator=seed_everything(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_auto_scale_follows_the_device(monkeypatch):
    monkeypatch.delenv("EFFREF_SCALE", raising=False)
    assert get_scale().name == ("paper" if torch.cuda.is_available() else "quick")
    monkeypatch.setenv("EFFREF_SCALE", "paper")
    assert get_scale() is SCALES["paper"]
    assert "paper scale" in get_scale().describe()


def test_unknown_scale_names_the_choices():
    with pytest.raises(ValueError, match="scale='huge'.*quick"):
        get_scale("huge")


@pytest.mark.parametrize("value, notebook, shown", [
    ("", False, False),  # a script or a test: library calls print nothing
    ("", True, True),  # a notebook (a chapter, Colab): bars
    ("1", False, True), ("on", False, True), ("0", True, False), ("off", True, False),
])
def test_progress_bars_follow_the_environment_switch(monkeypatch, capsys, value, notebook, shown):
    monkeypatch.setenv("EFFREF_PROGRESS", value)
    monkeypatch.setattr(runtime, "in_notebook", lambda: notebook)
    assert list(progress_bar(range(3), desc="counting", mininterval=0)) == [0, 1, 2]
    with progress_bar(total=2, desc="manual", mininterval=0) as bar:
        bar.update(2)
    err = capsys.readouterr().err
    assert ("counting" in err and "manual" in err) is shown and (err == "") is not shown


def test_progress_bars_stay_off_when_the_caller_says_so(monkeypatch, capsys):
    monkeypatch.setenv("EFFREF_PROGRESS", "1")
    list(progress_bar(range(3), desc="counting", disable=True))
    assert capsys.readouterr().err == ""


def test_bad_progress_switch_is_refused(monkeypatch):
    monkeypatch.setenv("EFFREF_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="EFFREF_PROGRESS='sometimes' is not an on/off value"):
        progress_bar(range(3))


def test_a_test_process_is_not_a_notebook():
    assert runtime.in_notebook() is False


def test_only_the_known_backend_import_noise_is_filtered(caplog):
    import effref.runtime  # noqa: F401  (installs the filters)

    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torch.utils._pytree").warning("%s is an Enum subclass and is now natively supported by "
                                                         "torch.compile", "Kind")
        logging.getLogger("kernels._internals.hf_hub").warning(
            "Skipping publisher trust check for 'kernels-community/x' because Hugging Face Hub is in offline mode.")
        logging.getLogger("torchao").warning("a quantization config was ignored")
        logging.getLogger("kernels._internals.hf_hub").warning("kernel 'x' not found")
    assert [r.getMessage() for r in caplog.records] == ["a quantization config was ignored", "kernel 'x' not found"]
