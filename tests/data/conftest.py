"""The data layer reads files through `datasets`; without it (some GPU images lack it) these tests skip."""
import pytest

pytest.importorskip("datasets", reason="simu_fast.data needs the datasets package")
