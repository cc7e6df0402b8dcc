"""Load any open_clip ViT by architecture name: a pretrained tag, a local checkpoint, random
init (seeded), or the bundled toy model. One code path for all of them, clear errors for the rest.

This is the only module that reaches the network (through open_clip's pretrained download).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch
from models.hashing import sha256_file
from models import towers
from models.towers import toys

TOY_DIR = Path(__file__).resolve().parent / "toy"
BUNDLED = "bundled"


class ModelError(ValueError):
    """A model cannot be loaded or is not supported; the message says why and what to do."""


_registered = False


def _register_bundled_configs() -> None:
    """Make the product's own configs (models/toy/*.json) known to open_clip, once."""
    global _registered
    if not _registered and TOY_DIR.is_dir():
        toys.register()          # the timm tower names the toy configs use
        open_clip.add_model_config(TOY_DIR)
        _registered = True


def toy_architectures() -> list[str]:
    """The toy architectures of the zoo: every ``models/toy/*.json`` config (with or without weights)."""
    return sorted(p.stem for p in TOY_DIR.glob("*.json"))


def bundled_weights(arch: str) -> Optional[Path]:
    path = TOY_DIR / f"{arch}.safetensors"
    return path if path.is_file() else None


def default_bank(arch: str) -> str:
    """The text bank a model's heads are named with by default: the shapes world's own bank
    ('shapes') for the toy models trained on it (every models/toy/*.json architecture, with
    shipped or random weights), the product's general bank ('atlas') for every other CLIP."""
    return "shapes" if (TOY_DIR / f"{arch}.json").is_file() else "atlas"


def _check_arch(arch: str) -> dict:
    """Return the open_clip config of `arch` or raise ModelError with close names."""
    _register_bundled_configs()
    names = open_clip.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model architecture '{arch}'.{hint} "
            "List them with: python -c 'import open_clip; print(open_clip.list_models())'"
        )
    cfg = open_clip.get_model_config(arch)
    _check_supported(arch, cfg)
    return cfg


def _check_supported(arch: str, cfg: dict) -> None:
    """Refuse towers the exact decomposition does not cover, saying why (models.towers.config_support)."""
    why = towers.config_support(arch, cfg)
    if why:
        raise ModelError(
            f"model '{arch}' is not supported: {why}. CLIP Atlas decomposes transformer image towers "
            "(open_clip ViTs, CLIPA, CoCa, and timm ViTs: SigLIP, SigLIP 2, PE-Core, EVA, MobileCLIP-B, ViTamin); "
            "list them with: python -m etl models"
        )


def catalogue() -> list[dict[str, Any]]:
    """Every open_clip architecture (and the toy zoo), with its pretrained tags and whether CLIP
    Atlas decomposes its image tower, in `open_clip.list_models()` order:

        {"arch", "tags": [...], "supported": bool, "reason": str | None, "tower": str}

    `tower` names the image tower's family as the config says it (open_clip's VisionTransformer
    with its pooling, a timm model, a ResNet); nothing is built but unknown timm modules, on meta.
    """
    _register_bundled_configs()
    out = []
    for arch in open_clip.list_models():
        cfg = open_clip.get_model_config(arch)
        v = cfg.get("vision_cfg", {})
        if v.get("timm_model_name"):
            tower = f"timm {v['timm_model_name']} (pool {v.get('timm_pool') or 'default'})"
        elif isinstance(v.get("layers"), (list, tuple)):
            tower = "open_clip ModifiedResNet"
        elif v.get("attentional_pool"):
            tower = "open_clip VisionTransformer (attentional pooler)"
        else:
            tower = f"open_clip VisionTransformer (pool {v.get('pool_type', 'tok')})"
        why = towers.config_support(arch, cfg)
        out.append(dict(arch=arch, tags=list(open_clip.list_pretrained_tags_by_model(arch)),
                        supported=why is None, reason=why, tower=tower))
    return out


def _offline_if_unreachable(host: str = "huggingface.co", timeout: float = 3.0) -> None:
    """Without network, use the Hugging Face cache only (instead of a minute of retries)."""
    import logging
    import threading
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    result: list = []
    t = threading.Thread(target=lambda: result.append(_resolves(host)), daemon=True)
    t.start()
    t.join(timeout)
    if not (result and result[0]):
        try:
            import huggingface_hub.constants as hf_constants
            hf_constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass


def _resolves(host: str) -> bool:
    import socket
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@dataclass
class LoadedModel:
    """An open_clip CLIP model in eval mode with everything the product needs to address it."""

    model: torch.nn.Module
    preprocess: Callable  # PIL.Image -> FloatTensor [3, S, S]
    tokenizer: Callable
    model_id: str
    spec: dict  # kwargs for load_model() that reload exactly this model
    source: str  # 'pretrained' | 'checkpoint' | 'random' | 'bundled'
    device: torch.device
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def tower(self) -> "towers.Tower":
        """The image tower's adapter (models/towers): what the decomposition reads; built once."""
        if "tower" not in self._cache:
            self._cache["tower"] = towers.tower(self.visual)
        return self._cache["tower"]

    @property
    def layers(self) -> int:
        return self.tower.layers

    @property
    def heads(self) -> int:
        return self.tower.heads

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def embed_dim(self) -> int:
        return self.tower.embed_dim

    @property
    def image_size(self) -> int:
        return self.tower.image_size

    @property
    def patch_size(self) -> int:
        return self.tower.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.tower.grid

    @property
    def pooling(self) -> str:
        """How the tower pools its tokens: 'tok' (class token), 'avg', 'map' (attention pool with a
        latent query and an MLP: SigLIP, PE-Core) or 'attn' (CoCa's attentional pooler)."""
        return self.tower.pooling

    def fingerprint(self) -> str:
        """sha256 of the image tower's weights (cached): names exported files so they never go stale."""
        if "fingerprint" not in self._cache:
            h = hashlib.sha256()
            for name, t in sorted(self.visual.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            self._cache["fingerprint"] = h.hexdigest()
        return self._cache["fingerprint"]

    def row(self) -> dict[str, Any]:
        """Columns of the warehouse `models` table (without analysed_layers and onnx_*)."""
        return dict(
            model_id=self.model_id, arch=self.spec["arch"], pretrained=self.spec.get("pretrained"),
            source=self.source, checkpoint_path=self.spec.get("checkpoint"),
            seed=self.spec.get("seed") if self.source == "random" else None,
            layers=self.layers, heads=self.heads, width=self.width, embed_dim=self.embed_dim,
            patch_size=self.patch_size, image_size=self.image_size, pooling=self.pooling,
        )


def load_model(
    arch: str,
    pretrained: Optional[str] = None,
    checkpoint: Optional[str | os.PathLike] = None,
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
) -> LoadedModel:
    """Load `arch` with exactly one weight source.

    pretrained: an open_clip tag (`open_clip.list_pretrained()` spelling), fetched from the
    Hugging Face cache or the network; checkpoint: a local .pt/.bin/.safetensors file;
    random_init: seeded random weights. A bundled model (toy-shapes) loads its shipped
    weights when no source is given.
    """
    cfg = _check_arch(arch)
    chosen = [pretrained is not None, checkpoint is not None, bool(random_init)]
    if sum(chosen) > 1:
        raise ModelError("give only one of --pretrained, --checkpoint, --random-init")
    shipped = bundled_weights(arch)
    if sum(chosen) == 0:
        if shipped is None:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ModelError(
                f"no weights given for '{arch}': pass --pretrained TAG (one of: {', '.join(tags) or 'none'}), "
                "--checkpoint FILE, or --random-init [--seed N]"
            )
        checkpoint, source = shipped, BUNDLED
    else:
        source = "pretrained" if pretrained else "checkpoint" if checkpoint else "random"
    device = check_device(device)
    if precision != "fp32" and device.type == "cpu":
        raise ModelError(f"precision {precision} needs a GPU (--device cuda); use fp32 on CPU")

    if pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise ModelError(
                f"unknown pretrained tag '{pretrained}' for '{arch}'. Known tags: {', '.join(tags) or 'none'}"
            )
        _offline_if_unreachable()
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir,
                pretrained_text=False, require_pretrained=True)
        except Exception as exc:  # network, hub, cache: say which and what to do
            raise ModelError(
                f"weights for {arch}/{pretrained} could not be fetched ({type(exc).__name__}: {exc}). "
                "Without network, download the checkpoint elsewhere and pass --checkpoint FILE "
                "(or set HF_HUB_CACHE to a cache that holds it)."
            ) from exc
        model_id = f"{arch}/{pretrained}"
    else:
        if random_init:
            torch.manual_seed(seed)
        # open_clip warns "No pretrained weights loaded ... initialized randomly" whenever it is given no
        # tag. Here it never tells anything: with a checkpoint (the toys' shipped weights included) the
        # weights are loaded just below, so it would be false; a random init was asked for by name
        # (--random-init, or a warehouse row whose source is 'random', whose model_id says random-seedN),
        # and a missing or unknown tag is refused above with its own error. So it is dropped.
        with _quiet_random_init_warning():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=None, device=device, precision=precision, pretrained_text=False)
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            if not checkpoint.is_file():
                raise ModelError(f"checkpoint file not found: {checkpoint}. Pass the path of a .pt, .bin or .safetensors file")
            load_state(model, checkpoint, arch)
            model_id = f"{arch}/{BUNDLED}" if source == BUNDLED else f"{arch}/ckpt-{sha256_file(checkpoint)[:12]}"
        else:
            model_id = f"{arch}/random-seed{seed}"
    model.eval()
    spec = dict(arch=arch, pretrained=pretrained,
                checkpoint=str(checkpoint) if checkpoint is not None and source != BUNDLED else None,
                random_init=bool(random_init), seed=seed if random_init else None)
    tokenizer = tokenizer_for(arch)
    return LoadedModel(model, preprocess, tokenizer, model_id, spec, source, device)


def tokenizer_for(arch: str) -> Callable:
    """The text tokenizer of `arch` (open_clip's choice: CLIP's own BPE, or a Hugging Face tokenizer
    named in the config, e.g. SigLIP's `timm/ViT-B-16-SigLIP`, read from the Hugging Face cache or
    fetched once with network). A ModelError says what is missing and what to do."""
    cfg = _check_arch(arch)
    hf_name = cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_name:
        _offline_if_unreachable()
        try:
            import transformers  # noqa: F401  (open_clip's HFTokenizer needs it)
        except ImportError:
            raise ModelError(f"the text tokenizer of '{arch}' ({hf_name}) needs the transformers package: "
                             "pip install -r requirements.txt") from None
    try:
        return open_clip.get_tokenizer(arch)
    except Exception as exc:  # hub, cache, a missing tokenizer library: say which and what to do
        said = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"the text tokenizer of '{arch}' ({hf_name or 'open_clip'}) could not be loaded ({type(exc).__name__}: "
            f"{said}). With network it is fetched once into the Hugging Face cache; without, copy a cache that "
            "holds it and set HF_HUB_CACHE to it") from exc


class _DropRandomInitWarning:
    """A logging filter: drops open_clip's "Model initialized randomly" record (see load_model)."""

    @staticmethod
    def filter(record) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """While the block runs, open_clip's root-logger warning that a model was initialized randomly is
    dropped (see load_model: through it, that warning never tells anything)."""
    import logging
    root = logging.getLogger()
    root.addFilter(_DropRandomInitWarning)
    try:
        yield
    finally:
        root.removeFilter(_DropRandomInitWarning)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has; a ModelError that says what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"'{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device} needs a GPU that torch can use, and torch finds none on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ModelError(f"device {device} does not exist: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ModelError(f"device {device} is not supported here; use cpu, cuda or cuda:N")


def load_state(model: torch.nn.Module, path: str | os.PathLike, arch: str) -> None:
    """Load a state dict into ``model`` (strict), cast to the model's dtype.

    Safetensors are read without pickle; torch files with ``weights_only=True``. A torch file
    may hold the state dict itself, or under ``state_dict`` or ``model`` (a train-toy checkpoint).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = read_safetensors(path, arch)
        else:
            try:
                with warnings.catch_warnings():   # torch warns about the pickle protocol of a raw
                    warnings.simplefilter("ignore")   # pickle before refusing it: the error says it all
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                said = str(exc)
                if "Unsupported global" in said:   # a class or function: unpickling would run code
                    raise ModelError(
                        f"checkpoint {path} is not a plain state dict (it would run code when unpickled); save it "
                        f"with torch.save(model.state_dict()) or as .safetensors") from None
                detail = said.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
                raise ModelError(f"cannot read checkpoint {path}: it is not a torch state dict (torch: "
                                 f"{' '.join(detail.split())[:200]}); pass a .pt, .bin or .safetensors state dict "
                                 f"saved with torch.save(model.state_dict())") from None
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
                    break
        if not isinstance(state, dict):
            raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        dtype = next(model.parameters()).dtype
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except ModelError:
        raise
    except RuntimeError as exc:
        first = " ".join(" ".join(str(exc).splitlines()[0:3]).split())
        raise ModelError(f"checkpoint {path} does not match architecture '{arch}': {first}") from exc
    except Exception as exc:
        said = " ".join(str(exc).split())
        raise ModelError(f"cannot read checkpoint {path}: {type(exc).__name__}: {said}") from exc


_unpacked: dict = {}


def read_safetensors(path: Path, arch: str) -> dict:
    """A safetensors state dict, read without pickle; a zoo file packed by models.zoo_pack is
    rebuilt from its seed (once per file and process)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from models import zoo_pack
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if not zoo_pack.is_packed(meta):
        return load_file(str(path))
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _unpacked:
        def init_state(seed: int) -> dict:
            with torch.random.fork_rng(), _quiet_random_init_warning():   # the packed weights follow
                torch.manual_seed(seed)
                m, _, _ = open_clip.create_model_and_transforms(arch, pretrained=None, pretrained_text=False)
            return m.state_dict()
        try:
            while len(_unpacked) >= 4:
                _unpacked.pop(next(iter(_unpacked)))
            _unpacked[key] = zoo_pack.unpack_state(load_file(str(path)), meta, init_state, source=str(path))
        except zoo_pack.PackError as exc:
            raise ModelError(str(exc)) from None
    return dict(_unpacked[key])


def model_from_row(row: dict, device: str = "cpu") -> LoadedModel:
    """Reload the model a warehouse `models` row describes."""
    source = row["source"]
    if source == BUNDLED:
        return load_model(row["arch"], device=device)
    if source == "pretrained":
        return load_model(row["arch"], pretrained=row["pretrained"], device=device)
    if source == "checkpoint":
        return load_model(row["arch"], checkpoint=row["checkpoint_path"], device=device)
    return load_model(row["arch"], random_init=True, seed=int(row["seed"] or 0), device=device)


# --------------------------------------------------------------------------- text encoding

_TRIM_POOLS = ("argmax", "eos")     # pool at one token of each text (its end of text), not at a fixed slot


def _is_causal(mask: Any, length: int) -> bool:
    """True when `mask` ([L, L], additive float or boolean 'True = masked') hides every later key
    (j > i) from every query i, i.e. position i sees positions 0..i only."""
    if not isinstance(mask, torch.Tensor) or mask.shape != (length, length):
        return False
    later = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)   # [L, L], j > i
    hidden = mask if mask.dtype == torch.bool else torch.isneginf(mask)                 # [L, L]
    return bool(hidden[later].all())


def text_trim_lengths(model: torch.nn.Module, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """How many leading tokens each text's embedding depends on, LongTensor [M], read off the model;
    None when the text tower cannot be trimmed exactly (it then runs on the full context).

    `tokens`: LongTensor [M, L] from the model's tokenizer, L = the model's context length.

    Trimming is exact when the model's own `encode_text` is open_clip's `CLIP.encode_text` and
    - its attention mask (`attn_mask`, [L, L]) is causal: token i attends to tokens 0..i only;
    - it pools one token per text by its content (`text_pool_type` 'argmax': the highest token id,
      CLIP's end-of-text; 'eos': the first `text_eos_id`), not a fixed slot ('first', 'last') or
      every token ('none');
    - positions are absolute (`positional_embedding` is [L, width], added by position) and every
      block is open_clip's (Custom)ResidualAttentionBlock: position-wise but for the masked attention.
    Then the pooled output at position p depends on tokens 0..p only, so running the batch on its
    first max(p) + 1 tokens changes nothing: padding after the end of text never reaches it.
    'last' pools the context's final slot (padding for short texts): trimming would move it, so no.
    CustomTextCLIP (Hugging Face towers, CoCa-style towers) and subclasses that override
    `encode_text` are not trimmed.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import (CustomResidualAttentionBlock, CustomTransformer,
                                       ResidualAttentionBlock, Transformer)
    if type(model).encode_text is not CLIP.encode_text:
        return None
    pool = getattr(model, "text_pool_type", None)
    eos = getattr(model, "text_eos_id", None)
    if pool not in _TRIM_POOLS or (pool == "eos" and eos is None):
        return None
    length = tokens.shape[1]
    pos = getattr(model, "positional_embedding", None)
    if not isinstance(pos, torch.Tensor) or pos.ndim != 2 or pos.shape[0] != length:
        return None
    if not _is_causal(getattr(model, "attn_mask", None), length):
        return None
    tower = getattr(model, "transformer", None)
    if type(tower) not in (Transformer, CustomTransformer) or not all(
            type(b) in (ResidualAttentionBlock, CustomResidualAttentionBlock) for b in tower.resblocks):
        return None
    # the pooled position, exactly as open_clip's text_global_pool picks it      [M]
    at = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == eos).int().argmax(dim=-1)
    return at + 1


def _encode_text_trimmed(model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` (open_clip 3.x, unnormalised) on the first n tokens only.

    text: LongTensor [B, n], n <= L; returns [B, d] in the tower's cast dtype. Every step is
    `CLIP.encode_text`'s with the positional embedding and the causal mask cut to n; with n = L it
    is `encode_text` itself. Only for models `text_trim_lengths` accepts.
    """
    from open_clip.transformer import text_global_pool
    n = text.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)                           # [B, n, width]
    x = x + model.positional_embedding[:n].to(cast_dtype)                    # absolute positions 0..n-1
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])              # [B, n, width], causal [n, n]
    x = model.ln_final(x)                                                    # [B, n, width]
    x = text_global_pool(x, text, model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))   # [B, width]
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection                                    # [B, width] @ [width, d]
    return x                                                                 # [B, d]


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (unnormalised, with autograd: training uses it), run on the batch's
    longest text only when the tower allows it exactly (`text_trim_lengths`). tokens: [B, L] -> [B, d]."""
    lengths = text_trim_lengths(model, tokens)                               # [B] or None
    if lengths is None or not len(tokens):
        return model.encode_text(tokens)
    return _encode_text_trimmed(model, tokens[:, :int(lengths.max())])


@torch.no_grad()
def encode_texts(lm: LoadedModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit text embeddings, FloatTensor [M, d] (float32, on CPU), row i for texts[i].

    Equal (to float rounding) to `lm.model.encode_text(lm.tokenizer(texts))`, normalised. When the
    text tower is causal with end-of-text pooling (`text_trim_lengths`), texts are batched in order
    of tokenised length and each batch runs on its longest text's tokens only, not the full
    context (77 for CLIP); other towers run on the full context, in the caller's order.
    """
    texts = list(texts)
    if not texts:
        return torch.zeros(0, lm.embed_dim)
    model = lm.model
    tokens = lm.tokenizer(texts)                                             # LongTensor [M, L]
    lengths = text_trim_lengths(model, tokens)                               # [M] or None
    if lengths is None:
        order, lengths = torch.arange(len(texts)), None
    else:
        order = torch.argsort(lengths, stable=True)                          # [M], shortest first
    out = None
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]                                       # [B] indices into texts
        if lengths is None:
            emb = model.encode_text(tokens[rows].to(lm.device))              # [B, d], full context
        else:
            n = int(lengths[rows].max())
            emb = _encode_text_trimmed(model, tokens[rows, :n].to(lm.device))  # [B, d], n <= L tokens
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).cpu()       # [B, d] unit
        if out is None:
            out = torch.empty(len(texts), emb.shape[1])                      # [M, d]
        out[rows] = emb                                                      # back to the caller's order
    return out
