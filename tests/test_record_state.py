"""Restore state lives in its own versioned field of a PassRecord, apart from the report.

Saves made before the field existed (restore keys in ``details``, no ``state_version``) still load;
a record from a newer aigc_opt is refused with the fix; Pass settings round-trip with their version.
"""

from __future__ import annotations

import json

import pytest
import torch

import aigc_opt as ao
from aigc_opt._manifest import manifest_digest
from aigc_opt.errors import IntegrityError, RecipeError
from aigc_opt.record import STATE_VERSION, PassRecord
from toy_models import make_mlp


def _rewrite(directory, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _as_before_restore_state(manifest: dict) -> None:
    """The manifest as aigc_opt wrote it before restore state had its own field."""
    for record in manifest["history"]:
        record["details"].update(record.pop("state"))
        del record["state_version"]


@pytest.fixture
def pruned(x):
    pytest.importorskip("torch_pruning")
    model = ao.Model(make_mlp(), example_inputs=(x,), target="host", factory=make_mlp)
    return ao.prune(model, 0.5)


def test_structure_is_restore_state_not_report(pruned):
    record = pruned.history[-1]
    assert record.state_version == STATE_VERSION
    assert "structure" in record.state and "structure" not in record.details
    assert record.details["layers"]  # the report keeps what a user reads


def test_save_from_before_restore_state_loads(tmp_path, pruned, x):
    pruned.save(tmp_path / "p")
    _rewrite(tmp_path / "p", _as_before_restore_state)
    legacy = json.loads((tmp_path / "p" / "manifest.json").read_text())["history"][-1]
    assert "state" not in legacy and "structure" in legacy["details"]
    loaded = ao.Model.load(tmp_path / "p", module=make_mlp())
    assert loaded.history[-1].state_version == 0
    assert loaded.num_parameters() == pruned.num_parameters() < sum(p.numel() for p in make_mlp().parameters())
    torch.testing.assert_close(loaded(x), pruned(x))


@pytest.mark.parametrize("version", [STATE_VERSION + 1, -1])
def test_record_with_unknown_state_version_is_refused(tmp_path, pruned, version):
    pruned.save(tmp_path / "p")

    def newer(manifest):
        manifest["history"][-1]["state_version"] = version

    _rewrite(tmp_path / "p", newer)
    with pytest.raises(IntegrityError, match="restore state version .*Upgrade|restore state version .*damaged"):
        ao.Model.load(tmp_path / "p", module=make_mlp())


def test_record_state_of_wrong_type_is_refused():
    base = dict(pass_type="Prune", config={}, seconds=0, format_before="torch", format_after="torch",
                size_before=1, size_after=1, params_before=1, params_after=1)
    with pytest.raises(IntegrityError, match="'state'"):
        PassRecord.from_dict({**base, "state": ["structure"], "state_version": 1})
    with pytest.raises(IntegrityError, match="'state_version'"):
        PassRecord.from_dict({**base, "state": {}, "state_version": True})


def test_quantize_kept_layers_are_restore_state(mlp_model, x):
    q = ao.quantize(mlp_model, "int8-dynamic")
    assert q.history[-1].state == {"method": "int8-dynamic"}
    assert q.history[-1].details["layers_quantized"] > 0


def test_pass_settings_round_trip_with_their_version():
    q = ao.Quantize("int8-dynamic", skip=("head",))
    assert ao.Quantize.from_dict(q.to_dict()) == q
    with pytest.raises(RecipeError, match="version 99"):
        ao.Quantize.from_dict({**q.to_dict(), "_version": 99})
    with pytest.raises(RecipeError, match="not of a Prune"):
        ao.Prune.from_dict(q.to_dict())
