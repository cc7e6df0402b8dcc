"""`import models` is lazy (models/__init__.py): reading pages never pay for torch and open_clip."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_models_package_loads_torch_only_when_a_model_name_is_used():
    code = ("import sys, models, models.similarity, models.images\n"
            "from models import load_image, ImageError\n"
            "print('torch' in sys.modules, 'open_clip' in sys.modules)\n"
            "import models.decompose\n"
            "from models import decompose, maps, Decomposition\n"
            "import types\n"
            "print(isinstance(decompose, types.FunctionType), decompose.__module__, maps.__name__,\n"
            "      models.decompose is decompose, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False False", "True models.decompose models.maps True True"], out


def test_every_exported_name_resolves():
    import models
    for name in models.__all__:
        assert getattr(models, name) is not None, name
