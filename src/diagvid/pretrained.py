"""Loading whole pipelines: the bundled toy models, a folder of ours, or a real Wan2.1 folder + generator.

Our pipeline folder:
    pipeline.json          StreamConfig fields (chunk size, latent size, fps, shift, default schedule, ...)
    generator/             causal student: model.safetensors + config.json (diagvid.model.weights)
    vae/                   vae.safetensors + vae.json (diagvid.model.vae)
    text/                  the toy text encoder (diagvid.model.text)
    tiny-decoder/          optional: the fast decoder for the VAE's latents (diagvid.model.tiny_decoder),
                           used with `decoder="tiny"` (`--decoder tiny`)

A real Wan2.1-T2V folder is combined with `generator=`, a distilled causal checkpoint (ours, Self-Forcing,
CausVid, LongLive, DD). Two layouts are read:
    diffusers   transformer/, vae/, text_encoder/, tokenizer/ (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
    original    config.json + diffusion_pytorch_model*.safetensors (the DiT), Wan2.1_VAE.pth,
                models_t5_umt5-xxl-enc-bf16.pth and the tokenizer folder google/umt5-xxl/ (Wan-AI/Wan2.1-T2V-1.3B);
                the .pth files are opened with weights_only=True, memory-mapped
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from diagvid.assets import ASSETS
from diagvid.config import from_dict
from diagvid.stream import Pipeline, StreamConfig

DEFAULT_PIPELINE = "toy"
DEFAULT_MOTION_CLASSIFIER = "toy/motion"
"""the bundled motion classifier for classifier guidance (`diagvid eval --teacher-motion-guidance`)"""
TINY_DECODER = "tiny-decoder"
"""a pipeline folder's optional fast decoder (`decoder="tiny"`)"""

# The toy students, all distilled from the toy teacher by the recipes in configs/toy/ and shipped under
# assets/toy/: the ODE-initialised causal student and the DMD students trained from it with the same compute.
# Method name -> (bundled generator, schedule, context policy) each is evaluated and benchmarked with; one
# student can serve two methods (Diagonal with the noisy context it was trained on, and with a clean one).
# The default pipeline's generator (toy/generator) is the one that measured best (docs/benchmarks.md): the
# diagonal schedule + flow matching without Diagonal Forcing.
TOY_STUDENT_METHODS: dict[str, tuple[str, str, str | None]] = {
    "ode-init": ("toy/students/ode-init", "diagonal", None),
    "causvid": ("toy/students/causvid", "causvid", None),
    "self-forcing": ("toy/students/self-forcing", "self-forcing", None),
    "diagonal": ("toy/students/diagonal", "diagonal", None),
    "diagonal-clean": ("toy/students/diagonal", "diagonal", "clean"),
    "diagonal-noflow": ("toy/students/diagonal-noflow", "diagonal", None),
    "diagonal-nodf": ("toy/generator", "diagonal", None),
    "schedule-only": ("toy/students/schedule-only", "diagonal", None),
}


def _resolve(name_or_path: str | Path) -> Path:
    """A bundled name (folder under diagvid/assets) or a path, with an error that lists both options."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = ASSETS / str(name_or_path)
    if bundled.exists():
        return bundled
    # the pipelines (top-level folders) and every folder of weights under them
    have = {p.name for p in ASSETS.iterdir() if p.is_dir() and not p.name.startswith("_")}
    have |= {str(w.parent.relative_to(ASSETS)) for w in ASSETS.rglob("*.safetensors")}
    raise FileNotFoundError(
        f"{name_or_path!r} is neither an existing path nor a bundled model (bundled: {sorted(have)})"
    )


def load_vae(name_or_path: str | Path, device=None, dtype=None):
    """The Wan VAE adapter from one of our folders, a diffusers `AutoencoderKLWan` folder, or the original
    release's `Wan2.1_VAE.pth` (the file, or the release folder holding it)."""
    from diagvid.model.vae import ORIGINAL_FILE, WanVAE

    path = _resolve(name_or_path)
    if path.is_file():
        vae = WanVAE.from_original_file(path)
    elif (path / ORIGINAL_FILE).is_file():
        vae = WanVAE.from_original_file(path / ORIGINAL_FILE)
    elif (path / "config.json").exists() and not (path / "vae.json").exists():
        vae = WanVAE.from_diffusers_folder(path)
    else:
        vae = WanVAE.load(path)
    return vae.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def check_decoder_dtype(decoder: str | Path | None, dtype: str | None) -> None:
    """ValueError unless `dtype` (None: the default) is a precision the decoder `decoder` can take: any of
    `STORAGE_DTYPES` for a tiny decoder, only fp32 for the VAE's own (None or "vae"), which is loaded in fp32."""
    from diagvid.model.weights import STORAGE_DTYPES

    if dtype is None:
        return
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"decoder dtype {dtype!r}; allowed: {', '.join(STORAGE_DTYPES)}")
    if (decoder is None or str(decoder) == "vae") and dtype != "fp32":
        raise ValueError(
            f"decoder dtype {dtype!r} is for a tiny decoder (decoder='tiny' or a folder); the VAE's own "
            "decoder computes in the VAE's precision"
        )


def load_tiny_decoder(name_or_path: str | Path, device=None, dtype: str | None = None):
    """A tiny streaming decoder (diagvid.model.tiny_decoder) from a bundled name or a folder, computing in
    `dtype` ("fp32", the default, "bf16" or "fp16")."""
    from diagvid.model.tiny_decoder import TinyDecoder
    from diagvid.model.weights import STORAGE_DTYPES

    check_decoder_dtype(name_or_path, dtype)
    if dtype in ("bf16", "fp16") and torch.device(device or "cpu").type == "cpu":
        from diagvid.machine import fast_bf16

        if dtype == "fp16" or fast_bf16() is False:
            warnings.warn(
                f"decoder dtype {dtype}: this CPU has no native {dtype} convolutions (AMX or AVX512-BF16 for "
                "bf16), so the decode may well be slower than in fp32",
                stacklevel=2,
            )
    decoder = TinyDecoder.load(_resolve(name_or_path)).to(device or "cpu", STORAGE_DTYPES[dtype or "fp32"])
    return decoder.eval()


def with_decoder(
    vae, decoder: str | Path | None, pipeline: Path | None = None, device=None, dtype: str | None = None
):
    """`vae` itself (decoder None or "vae"), or a codec that encodes with it and decodes with a tiny decoder:
    "tiny" is the pipeline folder's own `tiny-decoder/`, anything else a bundled name or folder. `dtype`: the
    tiny decoder's precision (`load_tiny_decoder`); bf16 decodes the toy stream about 4x faster on a CPU with
    AMX (docs/benchmarks.md)."""
    from diagvid.model.tiny_decoder import FastDecodeCodec

    check_decoder_dtype(decoder, dtype)
    if decoder is None or str(decoder) == "vae":
        return vae
    if str(decoder) == "tiny":
        if pipeline is None or not (pipeline / TINY_DECODER).is_dir():
            raise FileNotFoundError(
                f"decoder='tiny': {pipeline or 'this pipeline'} has no {TINY_DECODER}/ folder; pass a tiny decoder "
                "folder instead (diagvid train tiny-decoder --export DIR) or decoder='vae'"
            )
        decoder = pipeline / TINY_DECODER
    return FastDecodeCodec(vae, load_tiny_decoder(decoder, device or vae.device, dtype))


def load_text_encoder(name_or_path: str | Path, device=None):
    """The toy text encoder from one of our folders, or umT5 from a Wan2.1 folder (diffusers or original)."""
    from diagvid.model import text

    path = _resolve(name_or_path)
    if (path / "text_encoder").is_dir():
        return text.UMT5TextEncoder(path / "text_encoder", path / "tokenizer", device=device)
    if (path / text.ORIGINAL_FILE).is_file():
        return text.UMT5TextEncoder(path / text.ORIGINAL_FILE, path / text.ORIGINAL_TOKENIZER, device=device)
    return text.ToyTextEncoder.load(path).to(device or "cpu")


def load_features(name_or_path: str | Path, device=None):
    """The FVD-world feature network (diagvid.world.features) from a bundled name or a folder."""
    from diagvid.world.features import FeatureNet

    return FeatureNet.load(_resolve(name_or_path)).to(device or "cpu")


def load_motion_classifier(name_or_path: str | Path, device=None):
    """A motion classifier for classifier guidance (diagvid.model.motion) from a bundled name or a folder."""
    from diagvid.model.motion import MotionClassifier

    return MotionClassifier.load(_resolve(name_or_path)).to(device or "cpu")


def load_dit_model(name_or_path: str | Path, device=None, dtype=None):
    """A DiT (teacher, student, critic) from a bundled name or any folder or file `weights.py` reads.

    It computes in float32 unless `dtype` says otherwise, whatever precision the file stores (the shipped
    toy models are fp16 on disk: half the size; fp16 compute on a CPU would fail or crawl).
    """
    from diagvid.model.weights import load_dit

    return load_dit(_resolve(name_or_path), device=device, dtype=dtype or torch.float32)


def load_teacher(
    name_or_path: str | Path,
    high: str | Path | None = None,
    boundary: float | None = None,
    device=None,
    dtype=None,
):
    """A teacher DiT, or with `high` a pair of noise experts called like one (`NoiseExperts`, Wan2.2's
    split): `high` denoises the levels >= `boundary` (default: the toy expert's 0.7), `name_or_path` the
    rest. What eval, the ODE pairs and the DMD real score load as "the teacher". A model whose folder records
    a `noise_range` (a noise expert) warns when asked to denoise levels outside it: alone, or on the wrong
    side of `boundary`."""
    if boundary is not None and high is None:
        raise ValueError(f"teacher boundary {boundary}: only means something with a high-noise expert")
    low = load_dit_model(name_or_path, device=device, dtype=dtype)
    if high is None:
        _warn_outside_training(name_or_path, (0.0, 1.0), "alone")
        return low
    return with_high_expert(low, name_or_path, high, boundary, device=device, dtype=dtype)


def with_high_expert(
    low,
    low_name: str | Path,
    high: str | Path,
    boundary: float | None = None,
    device=None,
    dtype=None,
):
    """`NoiseExperts` of a loaded low-noise model (`low_name` names it in warnings) and the high-noise expert
    `high`, loaded here, at `boundary` (default: the toy expert's 0.7): how `load_teacher` pairs them, and how
    eval pairs an image-to-video expert with the teacher it already holds, without loading that twice."""
    from diagvid.model.experts import TOY_BOUNDARY, NoiseExperts

    boundary = TOY_BOUNDARY if boundary is None else boundary
    expert = load_dit_model(high, device=device, dtype=dtype)
    _warn_outside_training(low_name, (0.0, boundary), "as the low-noise expert")
    _warn_outside_training(high, (boundary, 1.0), "as the high-noise expert")
    return NoiseExperts(expert, low, boundary)


def _warn_outside_training(name_or_path: str | Path, levels: tuple[float, float], role: str) -> None:
    """Warn when a model is asked to denoise noise levels outside those its folder says it was trained at."""
    from diagvid.model.weights import read_noise_range

    lo, hi = read_noise_range(_resolve(name_or_path))
    if levels[0] < lo - 1e-6 or levels[1] > hi + 1e-6:
        warnings.warn(
            f"{name_or_path} was trained at noise levels [{lo:g}, {hi:g}] only, but {role} it denoises "
            f"[{levels[0]:g}, {levels[1]:g}], where it was never trained. "
            + (
                "Pair it with an expert for the other levels (high= / --teacher-high)."
                if role == "alone"
                else "Put the boundary at the edge of its range."
            ),
            stacklevel=3,
        )


def load_pipeline(
    name_or_path: str | Path | None = None,
    *,
    generator: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | None = None,
    decoder: str | Path | None = None,
    decoder_dtype: str | None = None,
    **stream_overrides,
) -> Pipeline:
    """A ready streaming pipeline.

    Args:
        name_or_path: "toy" (bundled, the default), a folder of ours, or a Wan2.1-T2V folder (diffusers or
            original release layout).
        generator: the causal checkpoint to generate with instead of the pipeline's own (any supported
            layout, or a bundled name such as "toy/students/self-forcing"); required for a Wan folder.
        device / dtype: where and in which precision the models run (default: cuda if present, fp32 on CPU,
            bf16 on GPU).
        config: with `generator`, the DiT preset of a checkpoint that carries no config.
        decoder: "vae" (default: the VAE's own decoder), "tiny" (the pipeline folder's `tiny-decoder/`, about 7x
            less decode time on the toy CPU) or a tiny decoder folder / bundled name.
        decoder_dtype: the tiny decoder's precision, "fp32" (default), "bf16" or "fp16" (bf16: about 4x faster
            on a CPU with AMX, 58-63 dB from fp32's pixels on toy streams; see docs/benchmarks.md).
        stream_overrides: StreamConfig fields to change (e.g. latent_hw=(60, 104), window_frames=21).
    """
    from diagvid.model import text as umt5
    from diagvid.model import vae as wan_vae
    from diagvid.model.weights import load_dit, load_generator

    # the original release layout beside the DiT's config.json + diffusion_pytorch_model*.safetensors
    original_files = (wan_vae.ORIGINAL_FILE, umt5.ORIGINAL_FILE, umt5.ORIGINAL_TOKENIZER, "config.json")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = _resolve(name_or_path or DEFAULT_PIPELINE)
    if generator is not None:
        generator = _resolve(generator)

    if (path / "pipeline.json").exists():  # ours (the bundled toy included)
        stream_cfg = from_dict(StreamConfig, json.loads((path / "pipeline.json").read_text()))
        dit = load_generator(generator, config=config) if generator else load_dit(path / "generator")
        vae = load_vae(path / "vae", device, torch.float32)
        text = load_text_encoder(path / "text", device)
    elif (path / "transformer").is_dir() and (path / "vae").is_dir():  # a real Wan2.1 folder
        if generator is None:
            raise ValueError(
                f"{path} is a Wan2.1 folder; pass generator= a distilled causal checkpoint (Self-Forcing, "
                "CausVid, LongLive, Diagonal Distillation or ours): the base model is not causal"
            )
        dit = load_generator(generator, config=config or str(path / "transformer"))
        vae = load_vae(path / "vae", device, torch.float32)
        text = load_text_encoder(path, device)
        stream_cfg = StreamConfig(frames_per_chunk=3, latent_hw=(60, 104), fps=16, shift=5.0)
    elif (path / wan_vae.ORIGINAL_FILE).is_file():  # a real Wan2.1 folder as released (original layout)
        lacking = [name for name in original_files if not (path / name).exists()]
        if lacking:
            raise FileNotFoundError(
                f"{path} holds {wan_vae.ORIGINAL_FILE} but lacks {', '.join(lacking)} (Wan2.1 original layout)"
            )
        if generator is None:
            raise ValueError(
                f"{path} is a Wan2.1 folder; pass generator= a distilled causal checkpoint (Self-Forcing, "
                "CausVid, LongLive, Diagonal Distillation or ours): the base model is not causal"
            )
        dit = load_generator(generator, config=config or str(path))
        vae = load_vae(path / wan_vae.ORIGINAL_FILE, device, torch.float32)
        text = load_text_encoder(path, device)
        stream_cfg = StreamConfig(frames_per_chunk=3, latent_hw=(60, 104), fps=16, shift=5.0)
    elif path.resolve().parent == ASSETS.resolve():
        raise FileNotFoundError(
            f"the bundled {path.name!r} pipeline has no trained generator yet (its codec and teacher ship, the "
            f"distilled causal student does not yet, see docs/status.md); pass --model a pipeline folder of yours "
            f"(diagvid assemble builds one), or a Wan2.1 folder with --generator"
        )
    else:
        raise ValueError(
            f"{path} is not a pipeline folder: expected pipeline.json (ours), transformer/ + vae/ + "
            f"text_encoder/ + tokenizer/ (Wan2.1 diffusers layout) or {' + '.join(original_files)} + "
            "diffusion_pytorch_model*.safetensors (Wan2.1 original layout)"
        )
    if stream_overrides:
        stream_cfg = from_dict(StreamConfig, {**asdict(stream_cfg), **stream_overrides})
    vae = with_decoder(vae, decoder, path, device, decoder_dtype)
    return Pipeline(dit.to(device=device, dtype=dtype), vae, text, stream_cfg)


def load_toy_student(
    method: str, device=None, dtype=None, decoder: str | None = None, decoder_dtype: str | None = None
) -> tuple[Pipeline, str, str | None]:
    """The bundled toy pipeline with a shipped student as its generator: (pipeline, schedule, context)."""
    if method not in TOY_STUDENT_METHODS:
        raise ValueError(f"unknown toy student {method!r}; allowed: {', '.join(TOY_STUDENT_METHODS)}")
    generator, schedule, context = TOY_STUDENT_METHODS[method]
    pipe = load_pipeline(
        DEFAULT_PIPELINE,
        generator=generator,
        device=device,
        dtype=dtype,
        decoder=decoder,
        decoder_dtype=decoder_dtype,
    )
    return pipe, schedule, context


def save_pipeline(pipe: Pipeline, folder: str | Path, *, dtype: str | None = None) -> Path:
    """Write a pipeline as one of our folders (generator, VAE, toy text encoder, pipeline.json).

    `dtype` ("fp16", "bf16", "fp32") stores the generator's and the VAE's weights in that precision (the
    shipped toy models are fp16: half the size; loading casts back to the device's precision). The text
    encoder keeps its own.
    """
    import copy

    from diagvid.fileperm import write_json
    from diagvid.model.tiny_decoder import FastDecodeCodec
    from diagvid.model.weights import STORAGE_DTYPES, save_dit

    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(STORAGE_DTYPES)}")

    def stored(module):
        return module if dtype is None else copy.deepcopy(module).to(STORAGE_DTYPES[dtype])

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_dit(stored(pipe.generator), folder / "generator", kind="generator")
    codec = pipe.vae
    if isinstance(codec, FastDecodeCodec):  # keep the fast decoder beside the VAE: decoder="tiny" finds it
        stored(codec.decoder).save(folder / TINY_DECODER)
        codec = codec.vae
    stored(codec).save(folder / "vae")
    pipe.text_encoder.save(folder / "text")
    cfg = asdict(pipe.config)
    cfg["latent_hw"] = list(cfg["latent_hw"])
    write_json(cfg, folder / "pipeline.json")  # last: a folder with pipeline.json is complete
    return folder


def assemble_pipeline(
    generator: str | Path,
    folder: str | Path,
    *,
    vae: str | Path = "toy/vae",
    text: str | Path = "toy/text",
    dtype: str | None = None,
    **stream_config,
) -> Path:
    """Build a pipeline folder from a trained causal generator (e.g. `diagvid train distill --export`), a VAE
    and a text encoder, after checking that they fit together; `stream_config` sets StreamConfig fields
    (default schedule, chunk size, latent size, ...)."""
    from diagvid.model.weights import load_dit
    from diagvid.sampling import get_schedule

    # settings first (from_dict names unknown keys), so a typo fails before any model is read
    cfg = from_dict(StreamConfig, {**asdict(StreamConfig()), **stream_config})
    get_schedule(cfg.schedule)  # an unknown default schedule fails here, not at the first generate
    dit = load_dit(_resolve(generator))
    codec = load_vae(vae)
    encoder = load_text_encoder(text)
    if dit.cfg.in_dim != codec.z_dim or dit.cfg.out_dim != codec.z_dim:
        raise ValueError(
            f"generator {generator} reads {dit.cfg.in_dim} and writes {dit.cfg.out_dim} latent channels; "
            f"the VAE {vae} has {codec.z_dim}"
        )
    if dit.cfg.text_dim != encoder.dim:
        raise ValueError(
            f"generator {generator} expects text_dim={dit.cfg.text_dim}; the text encoder {text} gives {encoder.dim}"
        )
    return save_pipeline(Pipeline(dit, codec, encoder, cfg), folder, dtype=dtype)
