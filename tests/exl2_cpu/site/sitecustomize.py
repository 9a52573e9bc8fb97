"""Loaded by every Python process a test starts with `tests/exl2_cpu/site` on PYTHONPATH (see
`exl2_cpu.subprocess_env()`): exllamav2 0.3.2, when the process imports it, runs on the CPU through the
stand-in extension and the device shim. quantkit's own command lines are unchanged: the converter is
still `python -m exllamav2.conversion.convert_exl2 ...`.
"""

import gc
import os
import sys
from importlib.abc import MetaPathFinder

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/exl2_cpu: exllamav2_ext, cpu_device


def _install() -> None:
    if _HERE not in sys.path:
        sys.path.append(_HERE)
    import cpu_device

    cpu_device.install()


class _OnFirstImport(MetaPathFinder):
    """Installs the shim just before the first `import exllamav2`; the normal finders then load it."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name == "exllamav2":
            sys.meta_path.remove(self)
            _install()
        return None


if os.environ.get("QUANTKIT_TEST_EXL2_CPU") == "1":
    if "exllamav2.conversion.convert_exl2" in sys.orig_argv:
        # exllamav2 calls gc.collect() ~30 times per conversion; with torch imported each call walks ~1e6
        # objects (0.2 s). Importing first and freezing what exists (gc.freeze only exempts those objects
        # from collection) makes each call cheap without changing exllamav2's code path.
        _install()
        import exllamav2.conversion.measure  # noqa: F401
        import exllamav2.conversion.optimize  # noqa: F401
        import exllamav2.conversion.quantize  # noqa: F401

        gc.collect()
        gc.freeze()
    else:
        sys.meta_path.insert(0, _OnFirstImport())
