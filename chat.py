"""
chat.py — the ECG chat model: an LLM that reads ECGs (and paper printouts of them), and the prompt format it reads
them in. It joins model.py (the LLM) and ecg_encoder.py (the encoders).

  1. Chat format   the added tokens and `encode_chat`, the template with its loss labels:
                     <bos><|user|>ECG1:<ecg><ecg_token>x n</ecg>ECG2:...<img><img_token>x m</img>question<|end|>
                     <|assistant|>answer<|end|>
                   No newlines around the markers, so a generation prompt is exactly the start of a training
                   sequence. An instruct checkpoint keeps its own format (`ChatFormat`: Llama-3's, ChatML), the
                   blocks on its reserved tokens where it has them.
  2. ECGChat       tokenizer + LLM + ECG encoder + projector (+ image encoder and its projector). `prompt` is the
                   one prompt builder (training, evaluation and the chat all call it); `embed` overwrites each
                   placeholder block with its input's projected tokens (nanoVLM-style splicing); forward with the
                   loss; generate; freezing per part; save/load as one folder; `from_anyecg`: anyECG-chat's release.

A model's *inputs* are, per prompt, a list of ECGRecords (data.py; the signal in mV at the encoder's rate) and
paper-ECG images (uint8 RGB (H, W, 3)): a row's inputs as they are read.
"""
import hashlib
import itertools
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from data import ECGRecord, read_json
from ecg_encoder import (AnyECG, ECGEncoder, EncoderConfig, ImageEncoder, ImageEncoderConfig, Projector, check_fits,
                         load_anyecg, load_state)
from model import LLM, Tokenizer, generate, left_pad, load_peft_adapter, save_pretrained


# --------------------------------------------------------------------------- 1. Chat format
# Added tokens, appended after the base vocabulary in this order.
ECG_START = "<ecg>"          # opens one ECG's block of placeholders
ECG_END = "</ecg>"           # closes it
ECG_TOKEN = "<ecg_token>"    # placeholder: its embedding is overwritten by one projected ECG token
USER = "<|user|>"            # chat-turn markers
ASSISTANT = "<|assistant|>"
END_TURN = "<|end|>"
IMG_START, IMG_END, IMG_TOKEN = "<img>", "</img>", "<img_token>"   # the same, for a paper-ECG image
SPECIAL_TOKENS = [ECG_START, ECG_END, ECG_TOKEN, USER, ASSISTANT, END_TURN, IMG_START, IMG_END, IMG_TOKEN]


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is laid out in text: `user` holds a user turn ({text}: its content, the ECG and image
    blocks first in the first one), `assistant` opens an assistant turn (and is the generation prompt), `end`
    closes it (the loss covers the answer through `end`, and generation stops there), `after` follows `end`.
    `trim`: the content is stripped, as Llama-3's template does. `marks`: the placeholder tokens (ecg_start,
    ecg_end, ecg, img_start, img_end, img): reserved tokens of the vocabulary where it has them."""
    name: str
    user: str
    assistant: str
    end: str
    after: str = ""
    trim: bool = False
    marks: tuple = (ECG_START, ECG_END, ECG_TOKEN, IMG_START, IMG_END, IMG_TOKEN)


FORMATS = {
    "nanoecg": ChatFormat("nanoecg", USER + "{text}" + END_TURN, ASSISTANT, END_TURN),   # the tiny LLM's own
    "llama3": ChatFormat("llama3", "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
                         "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", trim=True),
    "chatml": ChatFormat("chatml", "<|im_start|>user\n{text}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>",
                         after="\n"),                                                  # Qwen
}
# anyECG-chat puts its ECG block on Llama-3's reserved ids 128003-128005 (start, end, placeholder): no new rows
LLAMA3_MARKS = tuple(f"<|reserved_special_token_{k}|>" for k in range(1, 7))


def choose_format(tokenizer, name="auto"):
    """The format a checkpoint's tokenizer was made for (told by its special tokens) or the one named, with the
    placeholder marks it uses; the marks and turn markers the vocabulary lacks are added to the tokenizer (the LLM
    grows rows for them), reserved ones are reused."""
    if name == "auto":
        name = "llama3" if "<|start_header_id|>" in tokenizer.added else \
            "chatml" if "<|im_start|>" in tokenizer.added else "nanoecg"
    if name not in FORMATS:
        raise ValueError(f"chat format {name!r} unknown; known: auto, {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    if all(t in tokenizer.added for t in LLAMA3_MARKS):
        fmt = replace(fmt, marks=LLAMA3_MARKS)
    needed = list(fmt.marks) + ([USER, ASSISTANT, END_TURN] if name == "nanoecg" else [fmt.end])
    tokenizer.add_special_tokens([t for t in needed if t not in tokenizer.added])
    return fmt


def encode_chat(tokenizer, turns, ecg_token_counts, add_generation_prompt=False, image_token_counts=(),
                fmt=FORMATS["nanoecg"], label_ecgs=False):
    """turns: [("user", text), ("assistant", text), ...]; ecg_token_counts: placeholder tokens per ECG
    (encoder.num_tokens); image_token_counts: per image. -> (input_ids, labels), two equal-length lists, -100
    where no loss. The whole conversation is written out in `fmt` and encoded at once, as a Hugging Face chat
    template would be; the labels are the tokens that start inside an answer (through its `end`).
    add_generation_prompt: end with the opening of an assistant turn, for the model to continue.
    label_ecgs: with several ECGs, name each block ("ECG1:", "ECG2:", ...) as the answers name them: without a name
    nothing tells the model which block a question or an answer means (their time codes all start at 0)."""
    ecg_start, ecg_end, ecg, img_start, img_end, img = fmt.marks
    encoded = {t: tokenizer.encode(t) for t in (ecg_start, ecg_end, ecg, img_start, img_end, img, fmt.end)}
    bad = {t: ids for t, ids in encoded.items() if len(ids) != 1}
    if bad:
        raise ValueError(f"tokenizer does not encode special tokens as single ids: {bad}")
    named = label_ecgs and len(ecg_token_counts) > 1
    blocks = "".join((f"ECG{k + 1}:" if named else "") + ecg_start + ecg * int(n) + ecg_end
                     for k, n in enumerate(ecg_token_counts)) + \
        "".join(img_start + img * int(n) + img_end for n in image_token_counts)
    text, answers, placed = "", [], not blocks
    for role, content in turns:
        if role == "user":
            content = content if placed else blocks + content
            text, placed = text + fmt.user.format(text=content.strip() if fmt.trim else content), True
        elif role == "assistant":
            answer = (content.strip() if fmt.trim else content) + fmt.end   # what the loss covers
            text += fmt.assistant
            answers.append((len(text), len(text) + len(answer)))
            text += answer + fmt.after
        else:
            raise ValueError(f"turn role must be 'user' or 'assistant', got {role!r}")
    if not placed:
        raise ValueError("the ECG and image blocks go before the first user message, but there is no user turn")
    ids, starts = tokenizer.encode_offsets(text + (fmt.assistant if add_generation_prompt else ""))
    labels = [i if any(a <= s < b for a, b in answers) else -100 for i, s in zip(ids, starts)]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []   # Qwen has no <bos>
    return bos + ids, [-100] * len(bos) + labels


def turns_of(row, answered=True):
    """A row's conversation: its "history" (earlier [question, answer] exchanges about the same ECGs), its question,
    and when answered its answer and "followups" (later exchanges). history and followups are nanoECG's additions
    to anyECG's row format; training learns every answer in them, evaluation asks the question after the history."""
    def exchanges(pairs):
        return [turn for q, a in pairs for turn in (("user", q), ("assistant", a))]
    turns = exchanges(row.get("history", [])) + [("user", row["question"])]
    return turns + [("assistant", row["answer"])] + exchanges(row.get("followups", [])) if answered else turns


def split_inputs(inputs):
    """A prompt's inputs -> (its ECGRecords, its images), each in order."""
    return [x for x in inputs if isinstance(x, ECGRecord)], [x for x in inputs if not isinstance(x, ECGRecord)]


# --------------------------------------------------------------------------- 2. The ECG chat model
class ECGChat(nn.Module):
    """An LLM that reads ECGs: the n = encoder.num_tokens(samples) placeholders of each ECG's block are overwritten
    by its projected encoder tokens, in order; paper-ECG images (GEM's second modality) enter the same way through
    the `<img>` blocks. chat_format: "auto" (the tokenizer's own: Llama-3, ChatML, or nanoECG's) or a FORMATS name."""

    def __init__(self, llm, encoder, tokenizer, max_seq_len=None, image_encoder=None, chat_format="auto",
                 label_ecgs=False):
        super().__init__()
        self.llm, self.encoder, self.tokenizer = llm, encoder, tokenizer
        w = llm.embed_tokens.weight
        # anyECG-chat's encoder projects each 10 s window itself: its first token is the mean of projected CLS tokens
        self.projector = nn.Identity() if isinstance(encoder, AnyECG) else \
            Projector(encoder.cfg.d_model, llm.config.hidden_size).to(w.device, w.dtype)
        self.image_encoder = image_encoder
        self.image_projector = None if image_encoder is None else Projector(
            image_encoder.cfg.d_model, llm.config.hidden_size).to(w.device, w.dtype)
        self.format = choose_format(tokenizer, chat_format)   # adds the tokens the vocabulary lacks
        self.label_ecgs = label_ecgs                           # "ECG1:" before each block of a multi-ECG prompt
        if tokenizer.vocab_size > llm.config.vocab_size:
            llm.resize_vocab(tokenizer.vocab_size)  # room for the added special tokens
        self.ecg_token_id = tokenizer.added[self.format.marks[2]]
        self.img_token_id = tokenizer.added[self.format.marks[5]]
        self.max_seq_len = max_seq_len or llm.config.max_position_embeddings
        self.token_cache, self.token_cache_size = None, 0   # see cache_encoder_tokens

    def stop_ids(self):
        return tuple(i for i in (self.tokenizer.eos_id, self.tokenizer.added[self.format.end]) if i is not None)

    def check_fits(self, ecg_samples, n_text_tokens=0):
        """ECG lengths (samples) + text must fit the context: a clear error otherwise."""
        return check_fits(self.encoder, ecg_samples, self.max_seq_len, n_text_tokens)

    def prompt(self, turns, inputs, add_generation_prompt=False):
        """The conversation `turns` about `inputs` (a prompt's ECGRecords and images) -> (input_ids, labels), one
        placeholder block per input. A ValueError says why an input cannot be read by this model, or that the prompt
        (with room for one new token when generating) does not fit the context."""
        ecgs, images = split_inputs(inputs)
        if images and self.image_encoder is None:
            raise ValueError("the prompt has images but the model has no image encoder")
        short = [e.signal.shape[1] for e in ecgs if e.signal.shape[1] < self.encoder.cfg.patch_size]
        if short:
            raise ValueError(f"an ECG of {short[0]} samples is shorter than one encoder patch "
                             f"({self.encoder.cfg.patch_size} samples)")
        counts = [self.encoder.num_tokens(e.signal.shape[1]) for e in ecgs]
        ids, labels = encode_chat(self.tokenizer, turns, counts, add_generation_prompt,
                                  [self.image_encoder.num_tokens] * len(images) if images else [], self.format,
                                  self.label_ecgs)
        self.check_fits([e.signal.shape[1] for e in ecgs], len(ids) - sum(counts) + int(add_generation_prompt))
        return ids, labels

    def encode_ecgs(self, ecgs):
        """[ECGRecord, ...] -> [(n_tokens_i, C_llm), ...]"""
        if not ecgs:
            return []
        if isinstance(self.encoder, AnyECG):   # one (12, T) record at a time, as their encode_and_project_ecg
            return [self.encoder(e.signal) for e in ecgs]
        if self.token_cache is None:
            return [self.projector(t) for t in self.encoder([e.signal for e in ecgs], [list(e.leads) for e in ecgs])]
        return [self.projector(self.cached_tokens(e)) for e in ecgs]

    def cache_encoder_tokens(self, size):
        """While the encoder is frozen (train.py's stages after the warm-up), keep the tokens of up to `size` ECGs:
        it gives the same tokens every time, and encoding is about a quarter of a step. Each ECG is encoded alone,
        so its tokens do not depend on the batch that first met it (a resumed run gets the same ones). 0: off."""
        self.token_cache, self.token_cache_size = ({} if size else None), size

    @torch.no_grad()
    def cached_tokens(self, ecg):
        """The frozen encoder's tokens of one ECGRecord, (n_tokens, C_enc), looked up by the signal's content."""
        signal = np.ascontiguousarray(ecg.signal)
        key = (hashlib.blake2b(signal.tobytes(), digest_size=16).digest(), signal.shape, str(signal.dtype),
               tuple(ecg.leads))
        tokens = self.token_cache.get(key)
        if tokens is None:
            tokens = self.encoder([signal], [list(ecg.leads)])[0]
            if len(self.token_cache) < self.token_cache_size:
                self.token_cache[key] = tokens
        return tokens

    def encode_images(self, images):
        """[uint8 RGB (H, W, 3), ...] -> [(n_tokens, C_llm), ...]"""
        if not images:
            return []
        if self.image_encoder is None:
            raise ValueError("images given, but this model has no image encoder")
        return list(self.image_projector(self.image_encoder(images)))

    def embed(self, input_ids, inputs):
        """input_ids (B, T) -> embeddings (B, T, C), each placeholder block overwritten by its ECG's (image's)
        tokens. inputs: per prompt a list of ECGRecords and images."""
        x = self.llm.embed_tokens(input_ids)                                        # (B, T, C)
        if len(inputs) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} prompts but input lists for {len(inputs)}")
        per_prompt = [split_inputs(sample) for sample in inputs]
        x = self._splice(x, input_ids == self.ecg_token_id, [e for e, _ in per_prompt], self.encode_ecgs, "ECG",
                         self.format.marks[2])
        return self._splice(x, input_ids == self.img_token_id, [im for _, im in per_prompt], self.encode_images,
                            "image", self.format.marks[5])

    def _splice(self, x, slots, inputs, encode, kind, placeholder):
        """Overwrite the `slots` (B, T) of x with the encoded inputs, prompt by prompt."""
        tokens = encode([e for sample in inputs for e in sample])                   # [(n_i, C)]
        counts = iter(len(t) for t in tokens)
        for b, sample in enumerate(inputs):
            blocks, want = _run_lengths(slots[b].tolist()), [next(counts) for _ in sample]
            if blocks != want:
                raise ValueError(f"prompt {b}: placeholder blocks of {blocks} {placeholder}s but its "
                                 f"{len(sample)} {kind}(s) give {want} tokens; build the prompt with "
                                 "ECGChat.prompt")
        if not tokens:
            return x
        # masked_scatter fills the True slots in row-major order: prompt by prompt, and within
        # a prompt block by block, which is exactly the order of the flattened input list.
        return x.masked_scatter(slots[..., None], torch.cat(tokens).to(x.dtype))

    def forward(self, input_ids, inputs, labels=None, attention_mask=None):
        """-> logits (B, T, V), and with labels (-100 = no loss) the mean next-token loss. Right-padded training
        batches need no attention_mask (causal attention never lets a real token see the padding after it)."""
        if input_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len={self.max_seq_len}")
        logits = self.llm(inputs_embeds=self.embed(input_ids, inputs), attention_mask=attention_mask)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompts, inputs, max_new_tokens=256, **sampling):
        """prompts: token-id lists (from `prompt`); inputs: per prompt its ECGRecords and images, encoded once."""
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                             f"max_seq_len={self.max_seq_len}; shorten the ECG or lower max_new_tokens")
        device = self.llm.embed_tokens.weight.device
        ids, mask = left_pad(prompts, self.tokenizer.pad_id)
        x = self.embed(ids.to(device), inputs)
        sampling.setdefault("stop_ids", self.stop_ids())
        return generate(self.llm, ids, mask, inputs_embeds=x, max_new_tokens=max_new_tokens,
                        tokenizer=self.tokenizer, **sampling)

    def set_trainable(self, encoder=True, projector=True, llm=False, lora=True, image_encoder=None):
        """Freeze or unfreeze each part (the curriculum's stages differ only in this). The image encoder follows
        the ECG encoder unless image_encoder says otherwise; the image projector follows the projector."""
        image_encoder = encoder if image_encoder is None else image_encoder
        for module, on in [(self.encoder, encoder), (self.projector, projector),
                           (self.image_encoder, image_encoder), (self.image_projector, projector)]:
            for p in module.parameters() if module is not None else []:
                p.requires_grad_(on)
        for name, p in self.llm.named_parameters():
            p.requires_grad_(lora if ".lora_" in name else llm)

    # ---- one folder: config.json + model.safetensors + tokenizer, LLaVA-style
    def save(self, out_dir):
        """The LLM part is a plain Hugging Face Llama (LoRA merged) that transformers reads; encoder and
        projector sit beside it under ecg_encoder.* / ecg_projector.* (images: img_encoder.*, img_projector.*)."""
        extra = {f"{prefix}{k}": v for prefix, module in self._parts() for k, v in module.state_dict().items()}
        nanoecg = {"encoder": asdict(self.encoder.cfg), "max_seq_len": self.max_seq_len,
                   "chat_format": self.format.name, "label_ecgs": self.label_ecgs}
        if self.image_encoder is not None:
            nanoecg["image_encoder"] = asdict(self.image_encoder.cfg)
        save_pretrained(self.llm, out_dir, extra_tensors=extra, extra_config={"nanoecg": nanoecg})
        self.tokenizer.save(out_dir)

    def _parts(self):
        """(weight-name prefix, module) of everything beside the LLM in the checkpoint."""
        parts = [("ecg_encoder.", self.encoder), ("ecg_projector.", self.projector)]
        if self.image_encoder is not None:
            parts += [("img_encoder.", self.image_encoder), ("img_projector.", self.image_projector)]
        return parts

    @classmethod
    def load(cls, ckpt_dir, dtype=None, device=None):
        d = Path(ckpt_dir)
        tokenizer_file = "tokenizer.json" if (d / "tokenizer.json").is_file() else "tokenizer.model"
        for name in ("config.json", "model.safetensors", tokenizer_file):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: missing; a nanoECG checkpoint folder holds config.json, "
                                        "model.safetensors and tokenizer.model (or tokenizer.json)")
        raw = read_json(d / "config.json")
        if "nanoecg" not in raw:
            raise ValueError(f"{d / 'config.json'}: no 'nanoecg' section, so this is a plain LLM "
                             f"checkpoint, not an ECG-chat model (train one with train.py --llm {d})")
        llm = LLM.from_pretrained(d, dtype=dtype, device=device)
        encoder = ECGEncoder(EncoderConfig.from_dict(raw["nanoecg"]["encoder"]))
        image_cfg = raw["nanoecg"].get("image_encoder")
        image_encoder = ImageEncoder(ImageEncoderConfig(**image_cfg)) if image_cfg else None
        model = cls(llm, encoder, Tokenizer(d), raw["nanoecg"].get("max_seq_len"), image_encoder,
                    raw["nanoecg"].get("chat_format", "auto"), raw["nanoecg"].get("label_ecgs", False))
        for module in (model.encoder, model.image_encoder):
            if module is not None:
                module.to(llm.embed_tokens.weight.device, llm.embed_tokens.weight.dtype)
        model._load_parts(d / "model.safetensors")
        return model.eval()

    @classmethod
    def from_anyecg(cls, ckpt_dir, llm_dir, dtype=None, device=None):
        """anyECG-chat's release: their ECG encoder and projector (ecg_encoder.load_anyecg) and their LoRA adapter
        (adapter_config.json + adapter_model.safetensors, as peft saves it) from ckpt_dir, on the
        Llama-3-8B-Instruct folder llm_dir. Prompts use Llama-3's template with each ECG block on the reserved
        tokens 128003-128005, as theirs; the ECGs must be read as theirs are (data.anyecg_input, 12 x T at 100 Hz).
        The encoder stays in float32, as in their code; its tokens are cast to the LLM's dtype when spliced."""
        llm = LLM.from_pretrained(llm_dir, dtype=dtype, device=device)
        if not (Path(ckpt_dir) / "adapter_config.json").is_file():
            warnings.warn(f"{ckpt_dir}: no LoRA adapter (adapter_config.json); the LLM runs as it is (a stage-1 "
                          "checkpoint)")
        else:
            load_peft_adapter(llm, ckpt_dir)
        encoder = load_anyecg(ckpt_dir).to(llm.embed_tokens.weight.device)
        return cls(llm, encoder, Tokenizer(llm_dir), chat_format="llama3").eval()

    def _load_parts(self, path):
        """Encoder(s) and projector(s) from the checkpoint file; a mismatch is one error naming file and keys."""
        with safe_open(str(path), framework="pt") as f:
            for prefix, module in self._parts():
                state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
                load_state(module, state, f"{path} ({prefix}*)")


def _run_lengths(flags):
    """[F, T, T, F, T] -> [2, 1]: lengths of the runs of True values."""
    return [len(list(run)) for flag, run in itertools.groupby(flags) if flag]
