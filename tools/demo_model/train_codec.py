"""Train the demo model's codec: a small transformers `EncodecModel` (32 kHz, 4 codebooks,
50 frames/s, few filters) on the project's FluidSynth `notes` clips, on one CPU thread.

    python tools/demo_model/train_codec.py                   # train (or resume) runs/codec
    python tools/demo_model/train_codec.py --stop-after 500  # 500 more steps, then checkpoint
    python tools/demo_model/train_codec.py --export DIR      # write the codec of the checkpoint

The recipe (docs/demo_model.md): a reconstruction-first phase without the quantizer; then
codebooks from k-means on the encoder's outputs, EMA updates, dead-entry restarts and
quantizer dropout; waveform L1 plus multi-resolution STFT (log magnitude and spectral
convergence, FFT sizes 2048 down to 64); Adam with a warm-up and a cosine decay.

Resumable and deterministic: the run folder (git-ignored) holds recipe.json, ckpt.pt
(model with its codebook buffers, optimizer, step, RNG state) and log.jsonl. Every
step's randomness (crops, quantizer dropout, restarts) is drawn from generators seeded
by (seed, step), and torch runs on one thread, so a run from a seed, interrupted and
resumed or not, gives the same weights byte for byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import codec_data  # noqa: E402
import codec_vq  # noqa: E402
import recipe_args  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_RUN = HERE / "runs" / "codec"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    # model (EnCodec's 32 kHz layout: hop 640 = 8 * 5 * 4 * 4)
    filters: int = 8
    hidden: int = 64  # latent and codebook width
    lstm_layers: int = 1
    smooth_upsampling: bool = False  # start each transposed convolution as a linear interpolator
    codebook_size: int = 2048
    codebooks: int = 4
    # data
    data: codec_data.DataSpec = field(default_factory=codec_data.DataSpec)
    batch: int = 8
    crop_s: float = 0.5
    # schedule
    steps: int = 20000
    ae_steps: int = 3000  # reconstruction first: the quantizer joins at this step
    lr: float = 1e-3
    lr_final: float = 1e-4
    warmup: int = 200
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    # losses
    wave_weight: float = 1.0
    fft_sizes: tuple[int, ...] = (2048, 1024, 512, 256, 128, 64)
    log_floor: float = 1e-4  # added to window-normalised magnitudes before the log (-80 dB)
    commit_weight: float = 0.25
    # quantizer
    ema_decay: float = 0.99
    dead_share: float = 0.05  # an entry used less than this share of an even one restarts
    kmeans_batches: int = 40
    kmeans_iters: int = 10
    quantizer_dropout: float = 0.5  # share of steps that train on a random 1..3 levels
    # bookkeeping
    log_every: int = 50
    ckpt_every: int = 250

    @staticmethod
    def from_dict(d: dict) -> Recipe:
        d = dict(d)
        d["data"] = codec_data.DataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["data"].items()})
        for k in ("betas", "fft_sizes"):
            d[k] = tuple(d[k])
        return Recipe(**d)

    def with_overrides(self, pairs: list[str]) -> Recipe:
        return recipe_args.with_overrides(self, pairs, fixed=("data",))


def encodec_config(r: Recipe):
    from transformers import EncodecConfig

    from musicsteer.model.loading.load import encodec_32khz_config

    config = encodec_32khz_config(EncodecConfig)
    config.num_filters, config.hidden_size, config.codebook_dim = r.filters, r.hidden, r.hidden
    config.num_lstm_layers, config.codebook_size = r.lstm_layers, r.codebook_size
    config.target_bandwidths = [r.codebooks * config.frame_rate * math.log2(r.codebook_size) / 1000]
    return config


def build_model(r: Recipe):
    from transformers import EncodecModel

    torch.manual_seed(r.seed)
    model = EncodecModel(encodec_config(r))
    if r.smooth_upsampling:
        smooth_upsamplers(model, step_generator(r, 0, 5))
    return model


@torch.no_grad()
def smooth_upsamplers(model, gen: torch.Generator) -> None:
    """Each transposed convolution of the decoder (kernel 2 * stride) starts as linear
    interpolation in time times a random channel mixing: W[i, o, t] = P[i, o] * h[t], with
    h the triangle whose shifted copies sum to one. A random kernel repeats one shape at
    every input sample, a buzz at the input's rate (400 Hz and 50 Hz here) that an
    untrained decoder plays whatever the input; an interpolator has none."""
    from transformers.models.encodec.modeling_encodec import EncodecConvTranspose1d

    for module in model.decoder.modules():
        if not isinstance(module, EncodecConvTranspose1d):
            continue
        conv = module.conv
        c_in, c_out, k = conv.weight.shape
        s = conv.stride[0]
        if k != 2 * s:
            continue
        t = torch.arange(k, dtype=torch.float32)
        h = torch.where(t < s, (t + 0.5) / s, (2 * s - t - 0.5) / s)  # h[t] + h[t + s] = 1
        mix = torch.randn((c_in, c_out), generator=gen) * math.sqrt(2.0 / c_in)
        weight = mix[:, :, None] * h[None, None, :]  # (C_in, C_out, k)
        wn = conv.parametrizations.weight
        wn.original1.copy_(weight)
        wn.original0.copy_(torch.linalg.vector_norm(weight, dim=(1, 2), keepdim=True))
        conv.bias.zero_()


def learning_rate(r: Recipe, step: int) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = min(1.0, (step - r.warmup) / max(1, r.steps - r.warmup))
    return r.lr_final + 0.5 * (r.lr - r.lr_final) * (1 + math.cos(math.pi * t))


# -- losses -----------------------------------------------------------------------------

_WINDOWS: dict[int, torch.Tensor] = {}


def spectral_loss(y: torch.Tensor, x: torch.Tensor, sizes: tuple[int, ...], floor: float = 1e-4) -> torch.Tensor:
    """Mean over FFT sizes of log-magnitude L1 plus spectral convergence; y, x (B, S)."""
    total = y.new_zeros(())
    for n in sizes:
        if n not in _WINDOWS:
            _WINDOWS[n] = torch.hann_window(n)
        window = _WINDOWS[n]
        Y = torch.stft(y, n, n // 4, window=window, return_complex=True).abs() / window.sum()  # (B, bins, frames)
        X = torch.stft(x, n, n // 4, window=window, return_complex=True).abs() / window.sum()
        log_l1 = (torch.log(Y + floor) - torch.log(X + floor)).abs().mean()
        convergence = torch.linalg.norm(Y - X) / torch.linalg.norm(X).clamp_min(1e-6)
        total = total + log_l1 + convergence
    return total / len(sizes)


# -- one step ---------------------------------------------------------------------------

def step_generator(r: Recipe, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(r.seed * 1_000_003 + step * 7 + stream)


def quantizer_levels(r: Recipe, step: int) -> int:
    g = step_generator(r, step, 2)
    if torch.rand((), generator=g).item() < r.quantizer_dropout:
        return int(torch.randint(1, r.codebooks, (), generator=g))
    return r.codebooks


def train_step(model, opt, clips: codec_data.Clips, r: Recipe, step: int) -> dict:
    crop = int(r.crop_s * 32000)
    x = clips.batch(r.seed, step, r.batch, crop)  # (B, 1, S)
    for group in opt.param_groups:
        group["lr"] = learning_rate(r, step)
    z = model.encoder(x)  # (B, D, T)
    commit, levels, restarted = x.new_zeros(()), 0, 0
    if step >= r.ae_steps:
        levels = quantizer_levels(r, step)
        z, commit, restarted = codec_vq.quantize(model, z, levels, True, r.ema_decay, r.dead_share,
                                                 step_generator(r, step, 3))
    y = model.decoder(z)[..., :crop]  # (B, 1, S)
    wave = F.l1_loss(y, x)
    spec = spectral_loss(y[:, 0], x[:, 0], r.fft_sizes, r.log_floor)
    loss = r.wave_weight * wave + spec + r.commit_weight * commit
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
    opt.step()
    return {"step": step, "loss": loss.item(), "wave": wave.item(), "spec": spec.item(),
            "commit": commit.item(), "levels": levels, "restarted": restarted, "grad_norm": norm.item(),
            "lr": opt.param_groups[0]["lr"]}


@torch.no_grad()
def init_codebooks(model, clips: codec_data.Clips, r: Recipe) -> None:
    crop = int(r.crop_s * 32000)
    z = torch.cat([codec_vq.flat(model.encoder(clips.batch(r.seed, i, r.batch, crop, stream=2)))
                   for i in range(r.kmeans_batches)])  # (N, D)
    frames = r.batch * math.ceil(crop / 640)
    codec_vq.kmeans_init(model, z, r.kmeans_iters, step_generator(r, r.ae_steps, 4), frames)


# -- the run ----------------------------------------------------------------------------

class Run:
    """A run folder: recipe.json, ckpt.pt, log.jsonl."""

    def __init__(self, folder: Path, recipe: Recipe | None, data_dir: Path | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / "recipe.json"
        if saved.exists():
            on_disk = Recipe.from_dict(json.loads(saved.read_text()))
            if recipe is not None and recipe != on_disk:
                raise SystemExit(f"{saved} holds another recipe; use another --run folder, or drop --set")
            recipe = on_disk
        recipe = recipe or Recipe()
        saved.write_text(json.dumps(dataclasses.asdict(recipe), indent=1) + "\n")
        self.recipe = recipe
        self.data_dir = data_dir or folder.parent / "data"

    def clips(self) -> tuple[codec_data.Clips, codec_data.Clips]:
        codec_data.build(self.data_dir, self.recipe.data, workers=int(os.environ.get("DATASET_WORKERS", "1")))
        return codec_data.split(self.data_dir, self.recipe.data.families)

    def restore(self):
        """(model, optimizer, next step, whether the codebooks are initialised)."""
        r = self.recipe
        model = build_model(r)
        opt = torch.optim.Adam(model.parameters(), lr=r.lr, betas=r.betas)
        ckpt = self.folder / "ckpt.pt"
        if not ckpt.exists():
            return model.train(), opt, 0
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return model.train(), opt, state["step"]

    def save(self, model, opt, step: int) -> None:
        tmp = self.folder / "ckpt.pt.partial"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state(), "recipe": dataclasses.asdict(self.recipe)}, tmp)
        os.replace(tmp, self.folder / "ckpt.pt")

    def log(self, record: dict) -> None:
        with open(self.folder / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def train(run: Run, stop_after: int | None = None, eval_every: int = 0, eval_clips: int = 24,
          quiet: bool = False) -> int:
    """Train from the checkpoint to the recipe's last step (or `stop_after` more steps);
    returns the next step."""
    torch.set_num_threads(1)
    r = run.recipe
    train_clips, held = run.clips()
    model, opt, step = run.restore()
    end = r.steps if stop_after is None else min(r.steps, step + stop_after)
    started, t0 = step, time.perf_counter()
    while step < end:
        if step == r.ae_steps:
            init_codebooks(model, train_clips, r)
        record = train_step(model, opt, train_clips, r, step)
        step += 1
        if step % r.log_every == 0 or step == end:
            record["s_per_step"] = (time.perf_counter() - t0) / (step - started)
            run.log(record)
            if not quiet:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                      flush=True)
        if step % r.ckpt_every == 0 or step == end:
            run.save(model, opt, step)
        if eval_every and step % eval_every == 0:
            run.log(evaluate_now(model, held, step, eval_clips, step > r.ae_steps, quiet))
    return step


def evaluate_now(model, held: codec_data.Clips, step: int, clips: int, quantized: bool, quiet: bool) -> dict:
    import eval_codec

    from musicsteer.codec.codec import Codec

    was = model.training
    model.eval()
    copy = export_model(model)
    result = eval_codec.evaluate(Codec(copy, "checkpoint"), held, limit=clips, originals=False,
                                 quantized=quantized)
    model.train(was)
    record = {"step": step, "eval": {k: v for k, v in result.items() if k != "clips"}}
    if not quiet:
        print("eval", json.dumps(record), flush=True)
    return record


def export_model(model):
    """A copy of the model as its own encode/decode use it (codebooks in place); a fresh
    model loaded with the state (deepcopy of weight-normed modules breaks the original)."""
    from transformers import EncodecModel

    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the run's RNG alone
        out = EncodecModel(model.config)
    out.load_state_dict(model.state_dict())
    out.eval()
    for book in codec_vq.codebooks(out):
        book.inited.fill_(1.0)
    return out


def export(run: Run, out_dir: Path, half: bool = False) -> Path:
    """Write the checkpoint's codec with `save_pretrained`; `half` stores float16 (half the
    bytes; the loaders read it back as float32)."""
    torch.set_num_threads(1)
    model, _, step = run.restore()
    if step <= run.recipe.ae_steps:
        raise SystemExit(f"{run.folder}: step {step} is before the quantizer's phase ({run.recipe.ae_steps}); "
                         "nothing to export yet")
    out = export_model(model)
    (out.half() if half else out).save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(
        {"step": step, "dtype": "float16" if half else "float32", "recipe": dataclasses.asdict(run.recipe),
         "trainer": "tools/demo_model/train_codec.py"}, indent=1) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder (checkpoint, log, recipe)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: beside the run, data/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (new runs)")
    p.add_argument("--stop-after", type=int, default=None, help="train this many more steps, then stop")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="train up to this step, then stop (the shipped codec is step 8,250 of the 16,000-step run)")
    p.add_argument("--eval-every", type=int, default=0, help="CREPE on held-out clips every N steps (0: never)")
    p.add_argument("--export", type=Path, default=None, metavar="DIR", help="write the checkpoint's codec and exit")
    p.add_argument("--half", action="store_true", help="--export: store float16 weights (half the bytes)")
    args = p.parse_args(argv)
    recipe = Recipe().with_overrides(args.set) if args.set else None
    if recipe is None and not (args.run / "recipe.json").exists():
        recipe = Recipe()
    run = Run(args.run, recipe, args.data)
    if args.export is not None:
        print(f"wrote {export(run, args.export, args.half)}")
        return 0
    stop_after = args.stop_after
    if args.stop_at is not None:
        done = torch.load(run.folder / "ckpt.pt", weights_only=False)["step"] if (run.folder / "ckpt.pt").exists() else 0
        if done > args.stop_at:
            raise SystemExit(f"{run.folder} is at step {done}, past --stop-at {args.stop_at}; use a fresh --run folder")
        stop_after = args.stop_at - done
    step = train(run, stop_after, args.eval_every)
    print(f"{run.folder}: at step {step} of {run.recipe.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
