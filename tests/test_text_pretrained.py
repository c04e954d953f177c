"""Frozen pretrained text encoders (transformers), their disk cache, and embeddings precomputed
by the user. The models are tiny random CLIP and T5 encoders built here with a tokenizer built
here, saved with save_pretrained and loaded through the from_pretrained path users take: nothing
is downloaded."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from flowdiff.cli import main  # noqa: E402 (Lightning's loggers set up outside any capture)
from flowdiff.text import PrecomputedTextEncoder, PretrainedTextEncoder, TextCondition  # noqa: E402
from flowdiff.utils import UsageError  # noqa: E402

WORDS = "a an square circle at the top bottom left right red green blue big small".split()
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
LIMIT = 10  # the tokenizer's model_max_length


def save_tokenizer(folder: Path, kind: str) -> None:
    """A word-level tokenizer (the WORDS; CLIP: <bos> text <eos>, T5: text <eos>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<bos> $A <eos>" if kind == "clip" else "$A <eos>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>", model_max_length=LIMIT,
    ).save_pretrained(folder)  # fmt: skip


def save_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random CLIP text model (width 16) or T5 encoder (width 12) in ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    n = len(SPECIAL) + len(WORDS)
    if kind == "clip":
        config = CLIPTextConfig(
            vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=LIMIT, pad_token_id=0, bos_token_id=2,
            eos_token_id=3,
        )  # fmt: skip
        model = CLIPTextModel(config)
    else:
        config = T5Config(
            vocab_size=n, d_model=12, d_kv=6, d_ff=24, num_layers=2, num_heads=2,
            pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
        )  # fmt: skip
        model = T5EncoderModel(config)
    model.save_pretrained(folder)
    save_tokenizer(folder, kind)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: save_model(root / kind, kind) for kind in ("clip", "t5")}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLOWDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def reference(folder: Path, kind: str, texts: list[str]) -> TextCondition:
    """What the model gives, run directly with transformers: the expected encoding."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    cls = CLIPTextModel if kind == "clip" else T5EncoderModel
    model = cls.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    tokens = out.last_hidden_state * mask[..., None]
    if kind == "clip":
        pooled = out.pooler_output
    else:
        pooled = torch.stack([h[m].mean(0) for h, m in zip(tokens, mask, strict=True)])
    return TextCondition(tokens, mask, pooled)


def same(a: TextCondition, b: TextCondition, atol: float = 0.0) -> bool:
    return (
        torch.equal(a.mask, b.mask)
        and torch.allclose(a.tokens, b.tokens, atol=atol, rtol=0)
        and torch.allclose(a.pooled, b.pooled, atol=atol, rtol=0)
    )


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's bars in the tests' output


class Forwards:
    """Counts the forward passes of a transformers model class (patched for one test)."""

    def __init__(self, monkeypatch, cls):
        self.count, original = 0, cls.forward

        def forward(model, *args, **kwargs):
            self.count += 1
            return original(model, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forward)


CAPTIONS = [
    "a red square at the top", "a blue circle at the bottom left", "a big green square",
    "a small circle at the right", "an red circle", "a square",
]  # fmt: skip


# -- the encoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_encodes_as_the_model_does_through_from_pretrained(models, kind):
    encoder = PretrainedTextEncoder(str(models[kind]))
    out = encoder(CAPTIONS)
    # T5's pooled: a mean, summed in another order here (float rounding only).
    assert same(out, reference(models[kind], kind, CAPTIONS), atol=1e-6)
    assert out.tokens.shape[2] == encoder.dim == (16 if kind == "clip" else 12)
    assert encoder.trainable is False and not list(encoder.parameters())


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_the_null_caption_has_no_token_and_other_rows_are_unchanged(models, kind):
    encoder = PretrainedTextEncoder(str(models[kind]))
    out = encoder(["a red square", "", "a circle at the top"])
    assert out.is_null.tolist() == [False, True, False] and not out.pooled[1].any()
    expected = reference(models[kind], kind, ["a red square", "a circle at the top"])
    assert same(out[torch.tensor([0, 2])], expected, atol=1e-6)


def test_a_full_clip_checkpoint_gives_its_text_model(tmp_path):
    """What users pass most (openai/clip-vit-*): a CLIPModel folder, text and vision."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=LIMIT,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  image_size=8, patch_size=4)  # fmt: skip
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    clip.save_pretrained(tmp_path / "clip")
    save_tokenizer(tmp_path / "clip", "clip")
    encoder = PretrainedTextEncoder(str(tmp_path / "clip"))
    assert PretrainedTextEncoder.width({"path": str(tmp_path / "clip")}) == encoder.dim == 16
    texts = ["a red square", "a circle at the top"]
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    expected = TextCondition(out.last_hidden_state * mask[..., None], mask, out.pooler_output)
    assert same(encoder(texts), expected, atol=1e-6)


def test_width_and_limit_come_from_config_and_tokenizer_without_loading_weights(
    models, monkeypatch
):
    from transformers import CLIPTextModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(CLIPTextModel, "from_pretrained", refuse)
    assert PretrainedTextEncoder.width({"path": str(models["clip"])}) == 16
    assert PretrainedTextEncoder.width({"path": str(models["t5"])}) == 12
    encoder = PretrainedTextEncoder(str(models["clip"]))
    assert encoder.max_length == LIMIT and encoder.shared.model is None
    assert PretrainedTextEncoder(str(models["clip"]), max_length=4).max_length == 4


def test_a_prompt_longer_than_the_limit_is_cut_with_a_warning_naming_it(models):
    encoder = PretrainedTextEncoder(str(models["clip"]))
    long = "a big red square at the top left a small blue circle"  # 12 words: 14 tokens
    cut = " ".join(long.split()[: LIMIT - 2])  # <bos> 8 words <eos>
    (warning,) = encoder.prompt_warnings([long, "a square"])
    assert f"{LIMIT} tokens" in warning and "14 given" in warning and long in warning
    assert same(encoder([long]), reference(models["clip"], "clip", [cut]))


@pytest.mark.filterwarnings("ignore:.*is an instance of `nn.Module`")
def test_the_frozen_weights_stay_out_of_the_flow_model(models):
    import copy

    from flowdiff.module import FlowModule
    from flowdiff.nets.dit import DiT
    from flowdiff.objectives import ConditionalFlowMatching
    from flowdiff.paths import GaussianConditionalPath

    encoder = PretrainedTextEncoder(str(models["clip"]))
    encoder(["a square"])  # the model is loaded now
    net = DiT(1, 8, patch_size=4, hidden=8, depth=1, num_heads=2, text_dim=16)
    module = FlowModule(net, GaussianConditionalPath(), ConditionalFlowMatching(),
                        text_encoder=encoder)  # fmt: skip
    assert not any("text_encoder" in key for key in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in net.parameters())
    twin = copy.deepcopy(module)  # the EMA's copy: the frozen model is shared, not copied
    assert twin.text_encoder.shared.model is encoder.shared.model
    assert module.hparams["text_encoder"]["init_args"]["path"] == str(models["clip"])


# -- the cache -----------------------------------------------------------------------------------


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "text").iterdir() if not p.name.startswith("."))


def test_the_cache_is_computed_once_then_read_memory_mapped(models, cache, monkeypatch):
    from transformers import CLIPTextModel

    forwards = Forwards(monkeypatch, CLIPTextModel)
    first = PretrainedTextEncoder(str(models["clip"]), batch_size=4)
    first.prepare(CAPTIONS)
    assert forwards.count == 2  # 6 captions, 4 a batch
    (entry,) = entries(cache)
    tokens = entry / "tokens.npy"
    written = (tokens.stat().st_ino, tokens.stat().st_mtime_ns)
    assert json.loads((entry / "text.json").read_text()) == sorted(CAPTIONS)

    second = PretrainedTextEncoder(str(models["clip"]), batch_size=4)  # a second run
    second.prepare(list(reversed(CAPTIONS)) + CAPTIONS[:2])  # the same set: the same entry
    assert forwards.count == 2 and entries(cache) == [entry]
    assert (tokens.stat().st_ino, tokens.stat().st_mtime_ns) == written
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tokens.resolve()) in maps.read_text()  # memory-mapped, not read in
    out = second(CAPTIONS[::-1])
    assert forwards.count == 2 and second.shared.model is None  # never loaded
    assert same(out, reference(models["clip"], "clip", CAPTIONS[::-1]), atol=1e-6)

    mixed = [CAPTIONS[0], "a green circle at the top right", "", CAPTIONS[3]]
    before = forwards.count
    out = second(mixed)
    assert forwards.count == before + 1  # one forward, for the one text not in the cache
    assert out.is_null.tolist() == [False, False, True, False]
    real = torch.tensor([0, 1, 3])
    expected = reference(models["clip"], "clip", [mixed[i] for i in real])
    assert same(out[real], expected, atol=1e-6)


def test_another_caption_set_or_encoder_is_another_entry(models, cache, tmp_path):
    import shutil

    PretrainedTextEncoder(str(models["clip"])).prepare(CAPTIONS)
    PretrainedTextEncoder(str(models["clip"])).prepare(CAPTIONS + ["a square at the top"])
    assert len(entries(cache)) == 2
    other = save_model(tmp_path / "other", "clip", seed=1)  # other weights, same config
    PretrainedTextEncoder(str(other)).prepare(CAPTIONS)
    PretrainedTextEncoder(str(models["clip"]), max_length=5).prepare(CAPTIONS)
    assert len(entries(cache)) == 4
    copied = shutil.copytree(models["clip"], tmp_path / "copied")  # the same files elsewhere
    PretrainedTextEncoder(str(copied)).prepare(CAPTIONS)
    assert len(entries(cache)) == 4


def test_cache_false_writes_nothing_and_runs_the_model(models, cache, monkeypatch):
    from transformers import T5EncoderModel

    forwards = Forwards(monkeypatch, T5EncoderModel)
    encoder = PretrainedTextEncoder(str(models["t5"]), cache=False)
    encoder.prepare(CAPTIONS)
    encoder(CAPTIONS[:2])
    assert forwards.count == 1 and not (cache / "text").exists()


# -- embeddings given by the user -----------------------------------------------------------------


def write_embeddings(path: Path, folder: Path, texts: list[str], **extra) -> TextCondition:
    embeddings = reference(folder, "clip", texts)
    payload = {"text": texts, "tokens": embeddings.tokens, "mask": embeddings.mask,
               "pooled": embeddings.pooled, **extra}  # fmt: skip
    torch.save(payload, path)
    return embeddings


def test_precomputed_embeddings_are_looked_up_by_text(models, tmp_path):
    path = tmp_path / "embeddings.pt"
    embeddings = write_embeddings(path, models["clip"], CAPTIONS)
    encoder = PrecomputedTextEncoder(str(path))
    assert PrecomputedTextEncoder.width({"path": str(path)}) == encoder.dim == 16
    order = [4, 0, 2]
    out = encoder([CAPTIONS[i] for i in order])
    longest = int(embeddings.mask[order].sum(1).max())
    expected = embeddings[torch.tensor(order)]
    assert out.tokens.shape[1] == longest  # trimmed to the batch's longest text
    assert same(out, TextCondition(expected.tokens[:, :longest], expected.mask[:, :longest],
                                   expected.pooled))  # fmt: skip
    with pytest.raises(UsageError, match="no precomputed embeddings for 'a purple square'"):
        encoder(["a square", "a purple square"])
    with pytest.raises(UsageError, match="1 training captions have no embeddings.*'a circle'"):
        PrecomputedTextEncoder.from_data({"path": str(path)}, CAPTIONS + ["a circle"])


@pytest.mark.parametrize(
    "content, message",
    [
        ({"text": ["a"], "tokens": torch.zeros(1, 2, 4)}, "holds no mask, pooled"),
        (
            {
                "text": ["a", "b"],
                "tokens": torch.zeros(1, 2, 4),
                "mask": torch.ones(1, 2),
                "pooled": torch.zeros(1, 4),
            },
            "2 texts but tokens",
        ),  # fmt: skip
        (
            {
                "text": ["a"],
                "tokens": torch.zeros(1, 4),
                "mask": torch.ones(1, 2),
                "pooled": torch.zeros(1, 4),
            },
            "expected tokens",
        ),  # fmt: skip
    ],
)
def test_a_malformed_embeddings_file_is_one_clear_error(tmp_path, content, message):
    torch.save(content, tmp_path / "e.pt")
    with pytest.raises(UsageError, match=message):
        PrecomputedTextEncoder(str(tmp_path / "e.pt"))
    with pytest.raises(UsageError, match="no such file"):
        PrecomputedTextEncoder(str(tmp_path / "nothing.pt"))


# -- through the commands ------------------------------------------------------------------------


def fit_args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "images.yaml", "--model.net", "flowdiff.nets.dit.DiT",
        "--model.net.init_args.patch_size", "4", "--model.net.init_args.hidden", "16",
        "--model.net.init_args.depth", "1", "--model.net.init_args.num_heads", "2",
        "--data", "flowdiff.data.pairs.TensorPairsDataModule", "--data.init_args.path", str(data),
        "--data.init_args.batch_size", "32", "--trainer.max_steps", "4",
        "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
        "--model.sampler.init_args.steps", "2", "--validation.prompts",
        '["a square at the top left"]', "--trainer.val_check_interval", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def clip_run(models, tmp_path_factory) -> tuple[Path, Path, list[int]]:
    """``flowdiff fit`` twice with the frozen tiny CLIP on captioned squares, the same cache:
    (the first run's checkpoint, the cache, the model's forward passes in each run)."""
    from test_text_cli import squares
    from transformers import CLIPTextModel

    tmp = tmp_path_factory.mktemp("clip_run")
    x, text = squares()
    torch.save({"x": x, "text": text}, tmp / "squares.pt")
    encoder = ["--model.text_encoder", "flowdiff.text.PretrainedTextEncoder",
               "--model.text_encoder.init_args.path", str(models["clip"])]  # fmt: skip
    counts = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLOWDIFF_CACHE", str(tmp / "cache"))
        forwards = Forwards(patch, CLIPTextModel)
        main(fit_args(tmp / "squares.pt", tmp / "run", *encoder))
        counts.append(forwards.count)
        main(fit_args(tmp / "squares.pt", tmp / "again", *encoder, "--trainer.max_steps", "2"))
        counts.append(forwards.count - counts[0])
    return tmp / "run" / "checkpoints" / "last.ckpt", tmp / "cache", counts


def test_fit_records_the_encoder_by_its_path_and_reuses_the_cache(models, clip_run):
    from test_text_cli import SIDES

    from flowdiff.checkpoint import load_run, read_checkpoint

    ckpt_path, cache, forwards = clip_run
    # The 4 captions in one forward pass; validation's prompt and captions are among them. The
    # second run reads them all from the cache: the model never runs (nor loads).
    assert forwards == [1, 0]
    ckpt = read_checkpoint(ckpt_path)  # weights_only=True
    encoder = ckpt["hyper_parameters"]["text_encoder"]
    assert encoder["class_path"] == "flowdiff.text.PretrainedTextEncoder"
    assert encoder["init_args"]["path"] == str(models["clip"])
    assert ckpt["hyper_parameters"]["net"]["init_args"]["text_dim"] == 16
    for part in ("state_dict", "current_model_state"):
        assert not [key for key in ckpt.get(part, {}) if "text_encoder" in key]
    (entry,) = entries(cache)  # the training captions, encoded once
    assert json.loads((entry / "text.json").read_text()) == sorted(
        f"a square at the {side}" for side in SIDES
    )
    model = load_run(ckpt_path).model
    assert isinstance(model.text_encoder, PretrainedTextEncoder) and model.reads_text


def test_sample_encodes_prompts_with_the_frozen_encoder(clip_run, tmp_path, run_cli):
    long = "a square at the top left a square at the bottom right"  # 14 tokens
    code, _, err = run_cli(
        "sample", "--ckpt", clip_run[0], "--prompt", "a square at the bottom right",
        "--prompt", long, "--num-samples", "2", "--steps", "2", "--guidance", "1,3",
        "--out", tmp_path / "s",
    )  # fmt: skip
    assert code == 0, err
    assert f"warning: prompt cut to the text encoder's {LIMIT} tokens (14 given)" in err
    payload = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert payload["samples"].shape == (2, 4, 1, 8, 8)
    assert payload["prompts"] == ["a square at the bottom right"] * 2 + [long] * 2


def test_embeddings_beside_x_train_with_no_other_setting(models, tmp_path, run_cli):
    from test_text_cli import squares

    from flowdiff.checkpoint import read_checkpoint

    x, text = squares()
    data = tmp_path / "squares.pt"
    write_embeddings(data, models["clip"], text, x=x)
    code, _, err = run_cli(*fit_args(data, tmp_path / "run"))
    assert code == 0, err
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    encoder = read_checkpoint(ckpt_path)["hyper_parameters"]["text_encoder"]
    assert encoder == {"class_path": "flowdiff.text.PrecomputedTextEncoder",
                       "init_args": {"path": str(data)}}  # fmt: skip
    code, _, err = run_cli(
        "sample", "--ckpt", ckpt_path, "--prompt", "a square at the top right",
        "--num-samples", "1", "--steps", "1", "--out", tmp_path / "s",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        "sample", "--ckpt", ckpt_path, "--prompt", "a circle", "--num-samples", "1",
        "--out", tmp_path / "t",
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no precomputed embeddings for 'a circle'" in err and not (tmp_path / "t").exists()


@pytest.mark.parametrize("problem", ["no transformers", "no such folder"])
def test_bad_encoder_setups_are_one_line_before_training(models, tmp_path, run_cli, problem,
                                                          monkeypatch):  # fmt: skip
    from test_text_cli import squares

    x, text = squares(8)
    torch.save({"x": x, "text": text}, tmp_path / "squares.pt")
    path = str(models["clip"])
    if problem == "no transformers":
        monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
        message = "needs transformers: pip install 'flowdiff[text]'"
    else:
        path, message = str(tmp_path / "nothing"), f"path {str(tmp_path / 'nothing')!r} does not"
    code, _, err = run_cli(*fit_args(tmp_path / "squares.pt", tmp_path / "run",
                                     "--model.text_encoder", "flowdiff.text.PretrainedTextEncoder",
                                     "--model.text_encoder.init_args.path", path))  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
