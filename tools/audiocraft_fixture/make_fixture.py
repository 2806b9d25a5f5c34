#!/usr/bin/env python3
"""Build the tiny audiocraft-format MusicGen test fixture and audiocraft's own outputs for it.

Run this inside the scratch venv that `make_fixture.sh` creates (audiocraft 1.3.0 + a recent torch);
it must never be imported by the `musicsteer` package or its tests.

What it does, in order:

1. Trains a 64-piece SentencePiece model and makes a tiny, randomly initialised T5 *encoder* whose
   d_model (768) matches what audiocraft's T5Conditioner expects for the hub name ``t5-base``.
   The files go to ``<out>/t5/`` (weights stored as float16 to keep the fixture small) and a copy is
   placed into a throw-away Hugging Face cache under the name ``t5-base``, so audiocraft's
   ``T5Tokenizer.from_pretrained('t5-base')`` / ``T5EncoderModel.from_pretrained('t5-base')`` find it
   with HF_HUB_OFFLINE=1.
2. Composes the real MusicGen training config with Hydra from audiocraft's own config tree
   (``solver=musicgen/musicgen_base_32khz``, i.e. model/lm/musicgen_lm + conditioner/text2music +
   model_scale/small) and only shrinks the transformer (dim, heads, layers, card).
3. Builds the LM with audiocraft's ``builders.get_lm_model`` (audiocraft's own seeded weight init),
   then perturbs every LayerNorm weight/bias deterministically so that no parameter is a trivial
   all-ones / all-zeros tensor.
4. Writes ``state_dict.bin`` with audiocraft's ``export.export_lm`` (from a minimal training
   checkpoint) and ``compression_state_dict.bin`` with ``export.export_pretrained_compression_model``.
5. Reloads the LM from the fixture directory with audiocraft's ``loaders.load_lm_model`` and runs
   ``LMModel.generate`` greedily with CFG, capturing the logits of every decoding step, then
   cross-checks them against one full (non-streaming) forward pass.
6. Writes ``expected.npz`` and ``meta.json``.

Every output file is byte-for-byte reproducible (fixed seeds, single thread, fixed zip timestamps).
"""

import argparse
import copy
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Environment: must be set before transformers / huggingface_hub / audiocraft are imported, because
# those libraries read it at import time.
# --------------------------------------------------------------------------------------------------
_HF_HOME = tempfile.mkdtemp(prefix="audiocraft_fixture_hf_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("TRANSFORMERS_CACHE", None)
os.environ.pop("AUDIOCRAFT_CACHE_DIR", None)

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # CPU reductions are bit-reproducible for a fixed thread count
torch.use_deterministic_algorithms(True)

import sentencepiece as spm  # noqa: E402
import transformers  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import audiocraft  # noqa: E402
from audiocraft.models import builders, loaders  # noqa: E402
from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout, ConditioningAttributes  # noqa: E402
from audiocraft.utils import export  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Fixture parameters
# --------------------------------------------------------------------------------------------------
PROMPT = "lofi hip hop with warm piano"
CFG_COEF = 3.0
MAX_GEN_LEN = 120            # audio frames generated (EnCodec timesteps)
N_RAW_LOGIT_STEPS = 8        # first steps for which the raw cond/uncond logits are also stored

SEED_T5_INIT = 1234          # torch.manual_seed before building the tiny T5
SEED_T5_PERTURB = 4321       # generator for the T5 RMSNorm-weight perturbation
SEED_LM_INIT = 2042          # torch.manual_seed before builders.get_lm_model (see MIN_MARGIN)
SEED_LM_PERTURB = 6302       # generator for the LM LayerNorm perturbation
SEED_GENERATE = 0            # torch.manual_seed before generation (greedy: RNG unused, set anyway)
# Greedy parity needs decisions that float noise cannot flip. SEED_LM_INIT was picked among
# 2030..2045 as the one whose smallest top1-top2 gap of the CFG logits (over all valid decisions)
# is largest (0.0036, ~1000x the streaming-vs-full-forward difference); the run fails below this.
MIN_MARGIN = 1e-3
PERTURB_SCALE = 0.2          # LayerNorm/RMSNorm weight = 1 + 0.2*N(0,1), LayerNorm bias = 0.2*N(0,1)

T5_HUB_NAME = "t5-base"      # must be one of audiocraft's T5Conditioner.MODELS
T5_DIM = 768                 # audiocraft's T5Conditioner.MODELS_DIMS['t5-base']
# Fake "commit" of the throw-away HF cache entry (any 40-hex string works).
T5_CACHE_REVISION = hashlib.sha1(b"musicsteer tiny t5-base fixture").hexdigest()

# Hydra overrides on top of the real MusicGen training config. Everything else stays as composed.
TINY_LM_OVERRIDES = [
    "transformer_lm.dim=32",
    "transformer_lm.num_heads=4",
    "transformer_lm.num_layers=2",
    "transformer_lm.hidden_scale=4",
    "transformer_lm.n_q=4",
    "transformer_lm.card=128",
]

# Text the SentencePiece model is trained on (music-caption-like, so the prompt tokenises sensibly).
SPM_CORPUS = [
    "lofi hip hop with warm piano",
    "an upbeat electronic dance track with heavy bass",
    "calm acoustic guitar melody",
    "epic orchestral music with strings and drums",
    "jazz trio with piano bass and soft drums",
    "80s pop track with bassy drums and synth",
    "ambient soundscape with slow evolving pads",
    "funky groove with slap bass and brass section",
    "cinematic piano ballad with a sad mood",
    "rock song with distorted electric guitars",
    "reggae rhythm with organ and relaxed vocals",
    "chill lounge beat with vinyl crackle",
    "classical string quartet playing a waltz",
    "techno loop with a pounding kick drum",
    "folk song with banjo, fiddle and harmonica",
    "happy ukulele tune for a summer day",
]
SPM_VOCAB_SIZE = 64

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip member timestamp -> reproducible .npz bytes


def log(msg: str) -> None:
    print(f"[make_fixture] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Tiny T5
# --------------------------------------------------------------------------------------------------
def train_sentencepiece() -> bytes:
    """Train a T5-style unigram SentencePiece model (pad=0, eos=1, unk=2, no bos) and return its bytes.

    A sentence iterator and an in-memory writer are used so no file path ends up in the model's
    trainer spec (keeps the bytes reproducible).
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS),
        model_writer=buf,
        vocab_size=SPM_VOCAB_SIZE,
        model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0,
        # No Unicode normalisation table: real T5 uses nmt_nfkc, whose precompiled charsmap would add
        # ~240 kB to spiece.model and tokenizer.json each. ASCII prompts tokenise the same either way.
        normalization_rule_name="identity",
        hard_vocab_limit=True,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_tiny_t5(t5_dir: Path) -> dict:
    """Write a tiny T5 encoder + tokenizer into `t5_dir`; return facts for meta.json."""
    t5_dir.mkdir(parents=True, exist_ok=True)
    spm_bytes = train_sentencepiece()
    (t5_dir / "spiece.model").write_bytes(spm_bytes)

    # Let transformers convert spiece.model into its tokenizer files (tokenizer.json etc.).
    # extra_ids=0: no <extra_id_*> sentinels, the vocabulary is exactly the 64 SentencePiece pieces.
    with tempfile.TemporaryDirectory() as staging:
        shutil.copy(t5_dir / "spiece.model", Path(staging) / "spiece.model")
        (Path(staging) / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 0}))
        tokenizer = T5Tokenizer.from_pretrained(staging, extra_ids=0)
    assert len(tokenizer) == SPM_VOCAB_SIZE, len(tokenizer)
    tokenizer.save_pretrained(str(t5_dir))
    # Drop load-time bookkeeping that save_pretrained copies into tokenizer_config.json.
    tok_cfg_path = t5_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")

    config = T5Config(
        vocab_size=SPM_VOCAB_SIZE,
        d_model=T5_DIM,
        d_kv=8,
        d_ff=16,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="relu",          # t5-base uses a plain ReLU FF (not gated)
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(SEED_T5_INIT)
    model = T5EncoderModel(config).eval()  # transformers' own T5 init
    # T5's RMSNorm weights start at 1.0: perturb them so a loader that ignores them fails.
    gen = torch.Generator().manual_seed(SEED_T5_PERTURB)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "layer_norm" in name:
                p.add_(PERTURB_SCALE * torch.randn(p.shape, generator=gen))
    model = model.half()  # stored as float16 (small fixture); loaded back as float32, see below
    model.save_pretrained(str(t5_dir), safe_serialization=True)

    # save_pretrained records dtype=float16 in config.json; transformers >= 5 defaults to
    # dtype="auto" (= the config's dtype), which would run T5 in float16. Real t5-base is float32,
    # so declare float32: from_pretrained then upcasts the float16 tensors at load time.
    cfg_path = t5_dir / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json.pop("torch_dtype", None)  # older spelling of the same field
    cfg_json["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")

    return {
        "sentencepiece_vocab_size": SPM_VOCAB_SIZE,
        "sentencepiece_corpus": SPM_CORPUS,
        "config": {k: cfg_json[k] for k in sorted(cfg_json) if k in (
            "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance",
            "layer_norm_epsilon", "feed_forward_proj", "pad_token_id", "eos_token_id", "dtype")},
    }


def install_into_hf_cache(t5_dir: Path) -> Path:
    """Copy the tiny T5 into $HF_HOME/hub as if 't5-base' had been downloaded."""
    repo = Path(_HF_HOME) / "hub" / ("models--" + T5_HUB_NAME.replace("/", "--"))
    snapshot = repo / "snapshots" / T5_CACHE_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(t5_dir.iterdir()):
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(T5_CACHE_REVISION)
    return snapshot


# --------------------------------------------------------------------------------------------------
# 2.-4. LM config, build, perturb, export
# --------------------------------------------------------------------------------------------------
def compose_musicgen_config(config_dir: Path):
    """The real MusicGen(-small) training config, with only the transformer size shrunk."""
    overrides = ["solver=musicgen/musicgen_base_32khz"] + TINY_LM_OVERRIDES
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.1"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg, overrides


def perturb_layer_norms(lm: torch.nn.Module) -> list:
    """weight = 1 + s*N(0,1), bias = s*N(0,1) for every nn.LayerNorm of the LM (not the T5)."""
    gen = torch.Generator().manual_seed(SEED_LM_PERTURB)
    touched = []
    with torch.no_grad():
        for name, module in sorted(lm.named_modules()):
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(PERTURB_SCALE * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(PERTURB_SCALE * torch.randn(module.bias.shape, generator=gen))
                touched.append(name)
    return touched


def export_checkpoints(cfg, lm_state: dict, out_dir: Path) -> None:
    """Use audiocraft's own exporters, exactly as docs/MUSICGEN.md describes for a trained model."""
    with tempfile.TemporaryDirectory() as tmp:
        # Minimal stand-in for a solver checkpoint.th, i.e. what export_lm reads. 'xp.cfg' is stored
        # as a plain container (not a DictConfig) so torch.load(weights_only=True) accepts it;
        # export_lm turns it into the YAML string either way.
        train_ckpt = Path(tmp) / "checkpoint.th"
        torch.save({
            "xp.cfg": OmegaConf.to_container(cfg, resolve=False),
            "best_state": {"model": lm_state},
            "fsdp_best_state": None,
        }, train_ckpt)
        export.export_lm(train_ckpt, out_dir / "state_dict.bin")
    cwd = os.getcwd()
    try:
        # export_pretrained_compression_model checks Path(name).exists(); run it from an empty dir.
        with tempfile.TemporaryDirectory() as empty:
            os.chdir(empty)
            export.export_pretrained_compression_model("facebook/encodec_32khz",
                                                       out_dir / "compression_state_dict.bin")
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------------------------------------------
# 5. Generation with per-step logit capture
# --------------------------------------------------------------------------------------------------
class StepRecorder:
    """Wraps LMModel.forward (instance attribute) to record what each decoding step sees/returns.

    LMModel._sample_next_token calls `model(sequence, conditions=[], condition_tensors=...)` once per
    step, with the batch [cond row; uncond row] (two_step_cfg=False), and then mixes
    `uncond + (cond - uncond) * cfg_coef` and takes the argmax over the last position.
    """

    def __init__(self, lm):
        self.lm = lm
        self.inner = lm.forward
        self.inputs, self.outputs, self.offsets = [], [], []

    def __call__(self, sequence, conditions, condition_tensors=None, stage=-1):
        # Position offset the sinusoidal embedding will use for this call (streaming state).
        state = self.lm.transformer._streaming_state
        self.offsets.append(int(state["offsets"][0]) if "offsets" in state else 0)
        self.inputs.append(sequence.detach().clone())
        out = self.inner(sequence, conditions, condition_tensors, stage=stage)
        self.outputs.append(out.detach().clone())
        return out


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, coef: float) -> torch.Tensor:
    # Same expression, operand order and dtype as LMModel._sample_next_token.
    return uncond + (cond - uncond) * coef


def run_generation(lm):
    conditions = [ConditioningAttributes(text={"description": PROMPT})]

    # What generate() builds internally for CFG (two_step_cfg=False): cond + nullified cond, one batch.
    null_conditions = ClassifierFreeGuidanceDropout(p=1.0)(conditions)
    tokenized = lm.condition_provider.tokenize(conditions + null_conditions)
    desc_inputs = {k: v.clone() for k, v in tokenized["description"].items()}
    cond_tensors = lm.condition_provider(tokenized)
    cond_embeds, cond_mask = cond_tensors["description"]
    # The null (uncond) row: all-zero mask and exactly-zero cross-attention source.
    assert bool((cond_mask[1] == 0).all()) and bool((cond_embeds[1] == 0).all())
    assert bool((cond_mask[0] == 1).all())
    t5 = lm.condition_provider.conditioners["description"].t5
    with torch.no_grad():
        # Same batched call as T5Conditioner.forward (row 0 = cond, row 1 = uncond).
        t5_hidden = t5(**desc_inputs).last_hidden_state

    recorder = StepRecorder(lm)
    lm.forward = recorder
    try:
        torch.manual_seed(SEED_GENERATE)
        codes = lm.generate(
            prompt=None, conditions=conditions, max_gen_len=MAX_GEN_LEN,
            use_sampling=False, temp=1.0, top_k=0, top_p=0.0,
            cfg_coef=CFG_COEF, two_step_cfg=False, check=True)
    finally:
        del lm.forward  # back to the class method

    n_steps = len(recorder.outputs)
    K, card = lm.num_codebooks, lm.card
    special = lm.special_token_id

    # Rebuild the full interleaved sequence from audiocraft's own pattern + the returned codes.
    pattern = lm.pattern_provider.get_pattern(MAX_GEN_LEN)
    sequence, _, seq_mask = pattern.build_pattern_sequence(codes, special)  # [1, K, S]
    S = sequence.shape[-1]
    assert n_steps == S - 1, (n_steps, S)

    raw_cond, raw_uncond, mixed = [], [], []
    for i, (inp, out) in enumerate(zip(recorder.inputs, recorder.outputs)):
        # Step i feeds exactly one new column: sequence position i, at rotary/sin position i.
        assert inp.shape == (2, K, 1), inp.shape
        assert torch.equal(inp[0, :, 0], sequence[0, :, i]) and torch.equal(inp[1, :, 0], sequence[0, :, i])
        assert recorder.offsets[i] == i
        assert out.shape == (2, K, 1, card) and out.dtype == torch.float32
        c, u = out[0, :, -1], out[1, :, -1]
        m = cfg_mix(c, u, CFG_COEF)
        # The argmax of the mixed logits is the token written at position i+1 (where valid).
        pred = m.argmax(dim=-1)
        valid = seq_mask[:, i + 1]
        assert torch.equal(pred[valid], sequence[0, valid, i + 1]), f"step {i}"
        assert (sequence[0, ~valid, i + 1] == special).all()
        raw_cond.append(c)
        raw_uncond.append(u)
        mixed.append(m)
    mixed = torch.stack(mixed)          # [steps, K, card]
    raw_cond = torch.stack(raw_cond)
    raw_uncond = torch.stack(raw_uncond)

    # Cross-check: one non-streaming forward over the whole interleaved sequence (causal mask),
    # output position i must equal step i's logits.
    with torch.no_grad():
        full = lm(torch.cat([sequence, sequence], dim=0), conditions=[], condition_tensors=cond_tensors)
    full_mixed = cfg_mix(full[0], full[1], CFG_COEF).permute(1, 0, 2)[: S - 1]   # [S-1, K, card]
    full_diff = float((full_mixed - mixed).abs().max())
    assert full_diff < 1e-4, full_diff

    # Also through audiocraft's compute_predictions (pattern-reverted, aligned with codes).
    with torch.no_grad():
        preds = lm.compute_predictions(codes.expand(2, -1, -1).contiguous(), conditions=[],
                                       condition_tensors=cond_tensors, keep_only_valid_steps=False)
    # compute_predictions logits[b, q, t] are the outputs at sequence position t + q (=predicting
    # codes[q, t], which sits at position t + q + 1), i.e. step (t + q).
    cp = cfg_mix(preds.logits[0], preds.logits[1], CFG_COEF)                      # [K, T, card]
    cp_diff = 0.0
    for q in range(K):
        for t in range(MAX_GEN_LEN):
            cp_diff = max(cp_diff, float((cp[q, t] - mixed[t + q, q]).abs().max()))
    assert cp_diff < 1e-4, cp_diff

    # Greedy decisions should not hinge on float noise: margin between best and second best.
    top2 = mixed.topk(2, dim=-1).values
    margins = (top2[..., 0] - top2[..., 1])
    valid_steps = seq_mask[:, 1:].T                                                # [steps, K]
    min_margin = float(margins[valid_steps].min())

    return {
        "codes": codes[0],
        "sequence": sequence[0],
        "seq_mask": seq_mask,
        "logits": mixed,
        "raw_cond": raw_cond,
        "raw_uncond": raw_uncond,
        "desc_inputs": desc_inputs,
        "cond_embeds": cond_embeds,
        "cond_mask": cond_mask,
        "t5_hidden": t5_hidden,
        "full_forward_max_abs_diff": full_diff,
        "compute_predictions_max_abs_diff": cp_diff,
        "min_top1_top2_margin": min_margin,
    }


# --------------------------------------------------------------------------------------------------
# 6. Output helpers
# --------------------------------------------------------------------------------------------------
def save_npz_deterministic(path: Path, arrays: dict) -> None:
    """Same format as np.savez_compressed (one deflated .npy member per array), but with a fixed
    member timestamp and order so that reruns produce identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def check_all_parameters_nontrivial(state: dict) -> None:
    for k, v in state.items():
        v = v.float()
        assert not torch.all(v == 0), f"{k} is all zeros"
        assert not torch.all(v == 1), f"{k} is all ones"
        assert v.unique().numel() > 1, f"{k} is constant"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="fixture dir (tests/fixtures/audiocraft_tiny)")
    ap.add_argument("--config-dir", required=True, type=Path,
                    help="audiocraft's config/ tree (from the audiocraft 1.3.0 sdist)")
    args = ap.parse_args()
    out: Path = args.out
    assert audiocraft.__version__ == "1.3.0", audiocraft.__version__

    # Start from a clean fixture dir so no stale file survives.
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    try:
        log("building tiny T5 + tokenizer")
        t5_facts = build_tiny_t5(out / "t5")
        install_into_hf_cache(out / "t5")

        log("composing MusicGen config")
        cfg, overrides = compose_musicgen_config(args.config_dir)
        build_cfg = copy.deepcopy(cfg)
        build_cfg.device = "cpu"
        build_cfg.dtype = "float32"

        log("building LM with audiocraft builders")
        torch.manual_seed(SEED_LM_INIT)
        lm = builders.get_lm_model(build_cfg).eval()
        t5 = lm.condition_provider.conditioners["description"].t5
        assert next(t5.parameters()).dtype == torch.float32, "T5 must run in float32"
        norms = perturb_layer_norms(lm)
        lm_state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        check_all_parameters_nontrivial(lm_state)

        log("exporting checkpoints with audiocraft.utils.export")
        export_checkpoints(cfg, lm_state, out)

        log("reloading with audiocraft.models.loaders.load_lm_model")
        lm = loaders.load_lm_model(str(out), device="cpu")
        assert set(lm.state_dict()) == set(lm_state)
        for k, v in lm.state_dict().items():
            assert torch.equal(v, lm_state[k]), k
        t5 = lm.condition_provider.conditioners["description"].t5
        t5_dtype = str(next(t5.parameters()).dtype)
        assert t5_dtype == "torch.float32", t5_dtype

        log(f"generating {MAX_GEN_LEN} frames, greedy, cfg_coef={CFG_COEF}")
        res = run_generation(lm)
        log(f"full-forward max|diff| = {res['full_forward_max_abs_diff']:.3e}, "
            f"compute_predictions max|diff| = {res['compute_predictions_max_abs_diff']:.3e}, "
            f"min top1-top2 margin = {res['min_top1_top2_margin']:.4f}")
        assert res["min_top1_top2_margin"] > MIN_MARGIN, "greedy decisions too close to a tie"
    finally:
        shutil.rmtree(_HF_HOME, ignore_errors=True)

    steps, K, card = res["logits"].shape
    special = lm.special_token_id
    desc = res["desc_inputs"]
    arrays = {
        # --- the parity targets -----------------------------------------------------------------
        "codes": res["codes"].numpy().astype(np.int64),                       # [K, MAX_GEN_LEN]
        "sequence": res["sequence"].numpy().astype(np.int64),                 # [K, steps + 1]
        "logits": res["logits"].numpy().astype(np.float32),                   # [steps, K, card]
        # --- helpers for debugging a mismatch ---------------------------------------------------
        "sequence_valid": res["seq_mask"].numpy().astype(np.bool_),           # [K, steps + 1]
        "logits_cond_head": res["raw_cond"][:N_RAW_LOGIT_STEPS].numpy().astype(np.float32),
        "logits_uncond_head": res["raw_uncond"][:N_RAW_LOGIT_STEPS].numpy().astype(np.float32),
        "t5_input_ids": desc["input_ids"].numpy().astype(np.int64),           # [2, L] cond, uncond
        "t5_attention_mask": desc["attention_mask"].numpy().astype(np.int64), # [2, L] (after zeroing)
        "t5_last_hidden_state": res["t5_hidden"][0].numpy().astype(np.float32),  # [L, 768] cond row
        "cross_attention_src": res["cond_embeds"].detach().numpy().astype(np.float32),  # [2, L, dim]
    }
    save_npz_deterministic(out / "expected.npz", arrays)

    L = int(desc["input_ids"].shape[1])
    tl = cfg.transformer_lm
    meta = {
        "description": "Tiny audiocraft-format MusicGen checkpoint and the outputs audiocraft's own "
                       "LMModel.generate produced for it. Regenerate with "
                       "tools/audiocraft_fixture/make_fixture.sh.",
        "prompt": PROMPT,
        "cfg_coef": CFG_COEF,
        "two_step_cfg": False,
        "use_sampling": False,
        "max_gen_len": MAX_GEN_LEN,
        "num_steps": steps,
        "n_q": K,
        "card": card,
        "special_token_id": special,
        "dim": int(tl.dim),
        "delays": list(cfg.codebooks_pattern.delay.delays),
        "versions": {
            "audiocraft": audiocraft.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "sentencepiece": spm.__version__,
            "python": sys.version.split()[0],
        },
        "torch_num_threads": 1,
        "seeds": {
            "t5_init": SEED_T5_INIT, "t5_norm_perturb": SEED_T5_PERTURB,
            "lm_init": SEED_LM_INIT, "lm_layernorm_perturb": SEED_LM_PERTURB,
            "generate": SEED_GENERATE, "perturb_scale": PERTURB_SCALE,
        },
        "config": {
            "composed_with": "hydra compose(config_name='config') over audiocraft 1.3.0 config/",
            "overrides": overrides,
        },
        "lm_weights": {
            "init": "audiocraft LMModel init (weight_init=gaussian, depthwise_init=current, "
                    "zero_bias_init=true) under torch.manual_seed(lm_init); self/cross-attn "
                    "in_proj_weight keep PyTorch's default nn.Linear init (audiocraft's _init_weights "
                    "does not reach them); conditioner output_proj keeps nn.Linear default init",
            "perturbed_layernorms": norms,
            "stored_dtype": str(next(iter(lm_state.values())).dtype),
        },
        "t5": {
            "hub_name_audiocraft_loads": T5_HUB_NAME,
            "files": "t5/ (config.json, model.safetensors, spiece.model, tokenizer.json, "
                     "tokenizer_config.json)",
            "stored_dtype": "float16 (model.safetensors)",
            "runtime_dtype": t5_dtype + " (config.json declares dtype=float32, so from_pretrained "
                             "upcasts; audiocraft runs T5 without autocast on CPU)",
            "init": "transformers T5EncoderModel init under torch.manual_seed(t5_init), then every "
                    "RMSNorm weight += 0.2*N(0,1) (generator seed t5_norm_perturb), then cast to float16",
            **t5_facts,
            "tokenizer": "T5Tokenizer (extra_ids=0); appends </s> (id 1); pads with <pad> (id 0)",
        },
        "semantics": {
            "sequence": "The full interleaved (delay pattern [0,1,2,3]) sequence, shape [n_q, steps+1] "
                        f"= [{K}, {steps + 1}]. sequence[q, s] = codes[q, s - 1 - q] when "
                        f"0 <= s-1-q < max_gen_len, else the special token {special} (= card). "
                        "Column 0 is all special tokens (the initial step). sequence_valid is the "
                        "pattern mask (True where a real code sits).",
            "codes": "What LMModel.generate returned: [n_q, max_gen_len] EnCodec codes (0..card-1).",
            "logits": "logits[i, q, :] (i = 0..steps-1) are the CFG-mixed logits of decoding step i: "
                      "the model is fed sequence column i (all n_q tokens, embeddings summed) at "
                      "positional index i (sin embedding position i; the initial all-special column "
                      "is position 0), with the KV cache holding columns 0..i-1, and its output at "
                      "that position predicts sequence column i+1. "
                      "argmax(logits[i, q]) == sequence[q, i+1] wherever sequence_valid[q, i+1]; "
                      "where not valid audiocraft overwrites the prediction with the special token. "
                      "mixed = uncond + (cond - uncond) * cfg_coef, computed in float32 "
                      "(cond = batch row 0, uncond = batch row 1 of one batched forward).",
            "logits_cond_head/logits_uncond_head": f"raw per-row logits for steps 0..{N_RAW_LOGIT_STEPS - 1}",
            "equivalent_full_forward": "a single non-streaming forward over the whole sequence (causal "
                                       "mask, positions 0..steps) gives the same logits at output "
                                       "positions 0..steps-1 "
                                       f"(max abs diff {res['full_forward_max_abs_diff']:.2e}); "
                                       "audiocraft's compute_predictions agrees too "
                                       f"(max abs diff {res['compute_predictions_max_abs_diff']:.2e})",
            "min_top1_top2_margin_on_valid_steps": res["min_top1_top2_margin"],
        },
        "model_facts": {
            "block": "pre-norm (norm_first): x += SA(LN1(x)); x += CA(LN_cross(x), src); "
                     "x += W2 gelu(W1 LN2(x)); after all layers out_norm, then linears[q] per codebook",
            "input": "sum over q of emb[q][sequence[q, s]] (emb tables have card+1 rows; row card = "
                     "special token) + sinusoidal embedding (positional_scale 1.0)",
            "sin_embedding": "half = dim/2; phase_j = pos / 10000 ** (j / (half - 1)), j = 0..half-1; "
                             "emb = concat(cos(phase), sin(phase)); positions start at 0",
            "layer_norm_eps": 1e-5,
            "activation": "exact (erf) gelu, torch.nn.functional.gelu default",
            "attention": "in_proj_weight [3*dim, dim] rows = q, k, v (each dim rows, heads contiguous, "
                         "head h uses rows h*head_dim:(h+1)*head_dim of each block); scores scaled by "
                         "1/sqrt(head_dim); no biases anywhere in attention, FF or output linears; "
                         "self-attention causal; cross-attention unmasked, keys/values from src",
            "conditioner_output_proj": "condition_provider.conditioners.description.output_proj "
                                       "(weight [dim, 768], bias [dim])",
        },
        "conditioning": {
            "cond_row": "ConditioningAttributes(text={'description': prompt}) -> T5 tokenizer "
                        f"(prompt ids + </s>, length L={L}, attention_mask all 1) -> T5 encoder "
                        "last_hidden_state [L, 768] -> conditioner output_proj (Linear 768->dim, with "
                        "bias) -> multiplied by attention_mask -> cross_attention_src row 0 [L, dim]. "
                        "No positional embedding is added to the cross-attention source "
                        "(fuser.cross_attention_pos_emb=false).",
            "uncond_row": "generate() builds the null condition with ClassifierFreeGuidanceDropout(p=1.0): "
                          "description=None -> tokenised as '' -> ids [</s>] padded with <pad> to L; "
                          "its attention_mask is then forced to all zeros; after output_proj the "
                          "embeddings are multiplied by that mask, so cross_attention_src row 1 is "
                          "exactly zero [L, dim]. Cross-attention uses no key mask, and with "
                          "bias_attn=false keys/values of zero inputs are zero, so the cross-attention "
                          "block adds exactly 0 to the residual in the uncond row (equivalent to "
                          "skipping cross-attention).",
            "batching": "cond and uncond are one batch of 2 (two_step_cfg=false), same token columns.",
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    for f in sorted(out.rglob("*")):
        if f.is_file():
            log(f"wrote {f.relative_to(out)} ({f.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
