from __future__ import annotations

import pytest

from aigc_opt._registry import Registry
from aigc_opt.errors import ConfigError, MissingDependencyError, UnknownNameError, closest


def test_registry_register_get_and_refuse():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)

    @reg.register("beta")
    def beta():
        return 2

    assert reg.get("alpha") == 1 and reg.get("beta") is beta and reg.names() == ["alpha", "beta"]
    assert "alpha" in reg and len(reg) == 2 and list(reg) == ["alpha", "beta"]
    with pytest.raises(ConfigError, match="'alpha' is already registered"):
        reg.register("alpha", 3)
    with pytest.raises(UnknownNameError, match="Unknown widget 'alpah'. Did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(UnknownNameError, match="Known widgets: alpha, beta"):
        reg.get(["not", "hashable"])
    reg.unregister("alpha")
    assert "alpha" not in reg


def test_missing_dependency_message_has_the_pip_line():
    e = MissingDependencyError("torch-pruning", "prune", "Prune(structured=True)")
    assert 'pip install "aigc-opt[prune]"' in str(e) and e.install_command == 'pip install "aigc-opt[prune]"'
    e = MissingDependencyError("pandas", None, "Report.to_pandas()")
    assert "pip install pandas" in str(e)


def test_closest():
    assert closest("int8-dynamc", ["int8-dynamic", "fp16"]) == ["int8-dynamic"]
    assert closest("h100", ["nvidia-h100-sxm", "nvidia-t4"]) == ["nvidia-h100-sxm"]
    assert closest("zzz", ["alpha"]) == []
