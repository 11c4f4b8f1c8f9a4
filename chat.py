"""
chat.py — the ECG chat model: an LLM that reads ECGs, and the prompt format it reads them in. It joins model.py (the
LLM) and ecg_encoder.py (the encoder).

  1. Chat format   the added tokens and `encode_chat`, the template with its loss labels:
                     <bos><|user|>ECG1:<ecg><ecg_token>x n</ecg>ECG2:...question<|end|><|assistant|>answer<|end|>
                   No newlines around the markers, so a generation prompt is exactly the start of a training
                   sequence. An instruct checkpoint keeps its own format (`ChatFormat`: Llama-3's, ChatML), the
                   blocks on its reserved tokens where it has them.
  2. ECGChat       tokenizer + LLM + ECG encoder + projector. `prompt` is the one prompt builder (training,
                   evaluation and the chat all call it); `embed` overwrites each placeholder block with its ECG's
                   projected tokens (nanoVLM-style splicing); forward with the loss; generate; freezing per part;
                   save/load as one folder.

A model's *inputs* are, per prompt, a list of ECGRecords (data.py; the signal in mV at the encoder's rate). Other
inputs plug in beside them: images/chat.py adds paper-ECG images (GEM's second modality) on the <img> marks,
anyecg/release.py runs anyECG-chat's own encoder.
"""
import difflib
import hashlib
import itertools
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from data import ECGRecord, read_json
from ecg_encoder import ECGEncoder, EncoderConfig, Projector, load_state, saved_encoder_config
from model import LLM, Tokenizer, generate, is_llm_key, left_pad, save_pretrained


# --------------------------------------------------------------------------- 1. Chat format
# Added tokens, appended after the base vocabulary in this order.
ECG_START = "<ecg>"          # opens one ECG's block of placeholders
ECG_END = "</ecg>"           # closes it
ECG_TOKEN = "<ecg_token>"    # placeholder: its embedding is overwritten by one projected ECG token
USER = "<|user|>"            # chat-turn markers
ASSISTANT = "<|assistant|>"
END_TURN = "<|end|>"
IMG_START, IMG_END, IMG_TOKEN = "<img>", "</img>", "<img_token>"   # the same, for a paper-ECG image (images/)
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


def encode_chat(tokenizer, turns, blocks="", add_generation_prompt=False, fmt=FORMATS["nanoecg"]):
    """turns: [("user", text), ("assistant", text), ...]; blocks: the inputs' placeholder blocks
    (ECGChat.placeholders), written before the first user message. -> (input_ids, labels), two equal-length lists,
    -100 where no loss. The conversation is laid out in `fmt` as a Hugging Face chat template would write it, and
    encoded part by part: the template's parts with their special tokens, the turns' text as ordinary text (a
    "<|end|>" typed by a user is those characters, not the end of a turn). The labels are each answer's tokens
    through its `end`. add_generation_prompt: end with the opening of an assistant turn, for the model to continue."""
    bad = {t: ids for t in (*fmt.marks, fmt.end) if len(ids := tokenizer.encode(t)) != 1}
    if bad:
        raise ValueError(f"tokenizer does not encode special tokens as single ids: {bad}")
    parts, placed = [], not blocks   # (text, written by the template, learnt)
    user_before, user_after = fmt.user.split("{text}")
    for role, content in turns:
        if role == "user":   # the template trims the whole message, blocks and text (blocks start with no space)
            head = "" if placed else blocks
            content = (head + content).strip()[len(head):] if fmt.trim else content
            parts += [(user_before + head, True, False), (content, False, False), (user_after, True, False)]
            placed = True
        elif role == "assistant":
            content = content.strip() if fmt.trim else content
            parts += [(fmt.assistant, True, False), (content, False, True), (fmt.end, True, True),
                      (fmt.after, True, False)]
        else:
            raise ValueError(f"turn role must be 'user' or 'assistant', got {role!r}")
    if not placed:
        raise ValueError("the input blocks go before the first user message, but there is no user turn")
    parts.append((fmt.assistant if add_generation_prompt else "", True, False))
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []   # Qwen has no <bos>
    labels = [-100] * len(ids)
    for text, template, learnt in parts:
        part = tokenizer.encode(text, special=template)   # between special tokens, each part is encoded alone anyway
        ids, labels = ids + part, labels + (part if learnt else [-100] * len(part))
    return ids, labels


def ecg_blocks(counts, fmt=FORMATS["nanoecg"], named=False, seconds=None, last=False):
    """The placeholder blocks of ECGs of `counts` tokens each: '<ecg><ecg_token> x n</ecg>', in order. named: 'ECG1:',
    'ECG2:' ... before each block when there are several, as questions and answers name them: without a name nothing
    tells the model which block a question means (their time codes all start at 0). seconds: each ECG's length,
    stated before its block as the answers write times ('(45.9s)', 'ECG1 (10.0s):'): a token's time code says where
    it is, not where the record ends, and a finding that lasts the whole record ends there ('Duration: 0.0s-45.9s').
    last: with names, the last block is named as the last ('ECG4 (10.0s, last):'), so an answer written ECG by ECG
    can stop after it by looking up the name it just wrote, not by counting the blocks."""
    start, end, token = fmt.marks[:3]
    n = len(counts)
    names = [f"ECG{k + 1}" for k in range(n)] if named and n > 1 else [""] * n
    notes = [[f"{s:.1f}s"] for s in seconds] if seconds is not None else [[] for _ in range(n)]
    if last and n > 1 and named:
        notes[-1].append("last")
    heads = [(f"{a} " if a and b else a) + (f"({', '.join(b)})" if b else "") + (":" if a else "")
             for a, b in zip(names, notes)]
    return "".join(h + start + token * int(c) + end for h, c in zip(heads, counts))


ANSWER = "Answer:"   # ends a row's "reading": the dataset's own answer follows it (eval.final_answer)


def turns_of(row, answered=True):
    """A row's conversation: its "history" (earlier [question, answer] exchanges about the same ECGs), its question,
    and when answered its answer and "followups" (later exchanges). history and followups are nanoECG's additions
    to anyECG's row format; training learns every answer in them, evaluation asks the question after the history.
    A row with a "reading" (also nanoECG's) is answered reading first: 'Reading: 72 bpm, ... Answer: yes', so the
    model writes what it sees before it concludes from it (synthetic/skills.py teaches that step)."""
    def exchanges(pairs):
        return [turn for q, a in pairs for turn in (("user", q), ("assistant", a))]
    turns = exchanges(row.get("history", [])) + [("user", row["question"])]
    return turns + [("assistant", answer_text(row))] + exchanges(row.get("followups", [])) if answered else turns


def answer_text(row):
    """The assistant's text answering a row: its "reading" (when it has one), then 'Answer: ' and its answer."""
    return f"{row['reading']} {ANSWER} {row['answer']}" if row.get("reading") else row["answer"]


def ecg_key(ecg):
    """An ECGRecord's identity by content (its samples, their shape and type, its leads): the token cache's key."""
    signal = np.ascontiguousarray(ecg.signal)
    return hashlib.blake2b(signal.tobytes(), digest_size=16).digest(), signal.shape, str(signal.dtype), tuple(ecg.leads)


def split_inputs(inputs):
    """A prompt's inputs -> (its ECGRecords, the others), each in order."""
    return [x for x in inputs if isinstance(x, ECGRecord)], [x for x in inputs if not isinstance(x, ECGRecord)]


# --------------------------------------------------------------------------- 2. The ECG chat model
class ECGChat(nn.Module):
    """An LLM that reads ECGs: the n = encoder.num_tokens(samples) placeholders of each ECG's block are overwritten
    by its projected encoder tokens, in order. chat_format: "auto" (the tokenizer's own: Llama-3, ChatML, or
    nanoECG's) or a FORMATS name. projector: by default anyECG's Linear -> GELU -> Linear, built here; an encoder that
    projects its own tokens (anyecg/) comes with nn.Identity()."""

    def __init__(self, llm, encoder, tokenizer, max_seq_len=None, chat_format="auto", label_ecgs=False,
                 projector=None, ecg_seconds=False, name_last_ecg=False):
        super().__init__()
        self.llm, self.encoder, self.tokenizer = llm, encoder, tokenizer
        w = llm.embed_tokens.weight
        self.projector = projector if projector is not None else \
            Projector(token_width(encoder), llm.config.hidden_size).to(w.device, w.dtype)
        check_widths(encoder, self.projector, llm)   # before the tokenizer and the LLM grow rows
        self.format = choose_format(tokenizer, chat_format)   # adds the tokens the vocabulary lacks
        self.label_ecgs = label_ecgs                           # "ECG1:" before each block of a multi-ECG prompt
        self.ecg_seconds = ecg_seconds                         # "(45.9s)" before each block: the ECG's length
        self.name_last_ecg = name_last_ecg                     # "ECG4 (last):": where a per-ECG answer stops
        if tokenizer.vocab_size > llm.config.vocab_size:
            llm.resize_vocab(tokenizer.vocab_size)  # room for the added special tokens
        self.ecg_token_id = tokenizer.added[self.format.marks[2]]
        self.max_seq_len = max_seq_len or llm.config.max_position_embeddings
        self.token_cache, self.token_cache_size = None, 0   # see cache_encoder_tokens

    def stop_ids(self):
        return tuple(i for i in (self.tokenizer.eos_id, self.tokenizer.added[self.format.end]) if i is not None)

    # ---- prompts
    def prompt(self, turns, inputs, add_generation_prompt=False):
        """The conversation `turns` about `inputs` (a prompt's ECGRecords) -> (input_ids, labels), one placeholder
        block per input. A ValueError says why an input cannot be read by this model, or that the prompt (with room
        for one new token when generating) does not fit the context."""
        ids, labels = encode_chat(self.tokenizer, turns, self.placeholders(inputs), add_generation_prompt, self.format)
        lengths = [e.signal.shape[1] for e in split_inputs(inputs)[0]]   # samples per ECG
        n_ecg = sum(self.encoder.num_tokens(n) for n in lengths)
        self.check_fits(lengths, len(ids) - n_ecg + int(add_generation_prompt))
        return ids, labels

    def check_inputs(self, inputs):
        """A ValueError for inputs of one prompt that this model cannot read: it reads ECGRecords."""
        other = split_inputs(inputs)[1]
        if other:
            raise ValueError(f"the prompt has {len(other)} input(s) that are not ECGRecords (images?), but this model "
                             "reads ECGs only (train one that reads images with train.py --images)")

    def placeholders(self, inputs):
        """The inputs' placeholder blocks, in order (ecg_blocks). A ValueError for an input this model cannot read."""
        self.check_inputs(inputs)
        ecgs = split_inputs(inputs)[0]
        short = [e.signal.shape[1] for e in ecgs if e.signal.shape[1] < self.encoder.cfg.patch_size]
        if short:
            raise ValueError(f"an ECG of {short[0]} samples is shorter than one encoder patch "
                             f"({self.encoder.cfg.patch_size} samples)")
        seconds = [e.signal.shape[1] / self.encoder.cfg.fs for e in ecgs] if self.ecg_seconds else None
        return ecg_blocks([self.encoder.num_tokens(e.signal.shape[1]) for e in ecgs], self.format, self.label_ecgs,
                          seconds, self.name_last_ecg)

    def check_fits(self, ecg_samples, n_text_tokens=0):
        """The ECG tokens of ECGs of these lengths (samples), or a clear error if they and n_text_tokens do not fit
        the context."""
        n_ecg = sum(self.encoder.num_tokens(n) for n in ecg_samples)
        if not ecg_samples and n_text_tokens > self.max_seq_len:
            raise ValueError(f"the text is {n_text_tokens} tokens; the LLM context allows {self.max_seq_len} "
                             "(train.py --max_seq_len)")
        if n_ecg + n_text_tokens > self.max_seq_len:
            secs = ", ".join(f"{n / self.encoder.cfg.fs:g}" for n in ecg_samples)
            room = max(0, self.max_seq_len - n_text_tokens)
            raise ValueError(f"ECG(s) of {secs} s need {n_ecg} tokens, plus {n_text_tokens} text tokens; the LLM "
                             f"context allows {self.max_seq_len} (room for about {self.encoder.max_seconds(room):g} "
                             "s of ECG). Use a shorter part of the ECG, or a model trained with a longer context "
                             "(train.py --max_seq_len).")
        return n_ecg

    # ---- ECG tokens into the LLM
    def encode_ecgs(self, ecgs):
        """[ECGRecord, ...] -> [(n_tokens_i, C_llm), ...]"""
        if not ecgs:
            return []
        if self.token_cache is None:
            return [self.projector(t) for t in self.encoder([e.signal for e in ecgs], [list(e.leads) for e in ecgs])]
        return [self.projector(self.cached_tokens(e)) for e in ecgs]

    def cache_encoder_tokens(self, size):
        """While the encoder is frozen (train.py's stages after the warm-up), keep the tokens of up to `size` ECGs:
        it gives the same tokens every time, and encoding is a good part of a step. Each ECG is encoded alone, so its
        tokens do not depend on the batch that first met it (a resumed run gets the same ones). 0: off."""
        self.token_cache, self.token_cache_size = ({} if size else None), size

    @torch.no_grad()
    def cached_tokens(self, ecg):
        """The frozen encoder's tokens of one ECGRecord, (n_tokens, C_enc), looked up by the signal's content."""
        signal, key = np.ascontiguousarray(ecg.signal), ecg_key(ecg)
        tokens = self.token_cache.get(key)
        if tokens is None:
            tokens = self.encoder([signal], [list(ecg.leads)])[0]
            if len(self.token_cache) < self.token_cache_size:
                self.token_cache[key] = tokens
        return tokens

    def embed(self, input_ids, inputs):
        """input_ids (B, T) -> embeddings (B, T, C), each ECG placeholder block overwritten by its ECG's tokens.
        inputs: per prompt a list of ECGRecords."""
        x = self.llm.embed_tokens(input_ids)                                        # (B, T, C)
        if len(inputs) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} prompts but input lists for {len(inputs)}")
        for sample in inputs:
            self.check_inputs(sample)
        ecgs = [split_inputs(sample)[0] for sample in inputs]
        return self.splice(x, input_ids == self.ecg_token_id, ecgs, self.encode_ecgs, "ECG", self.format.marks[2])

    def splice(self, x, slots, inputs, encode, kind, placeholder):
        """Overwrite the `slots` (B, T) of x with the encoded inputs (per prompt a list), prompt by prompt."""
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

    def forward(self, input_ids, inputs, labels=None, attention_mask=None, document_ids=None):
        """-> logits (B, T, V), and with labels (-100 = no loss) the mean next-token loss. Right-padded training
        batches need no attention_mask (causal attention never lets a real token see the padding after it).
        document_ids (B, T): texts packed in a row, each attending to itself alone (LLM.forward)."""
        if input_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len={self.max_seq_len}")
        logits = self.llm(inputs_embeds=self.embed(input_ids, inputs), attention_mask=attention_mask,
                          document_ids=document_ids)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompts, inputs, max_new_tokens=256, **sampling):
        """prompts: token-id lists (from `prompt`); inputs: per prompt its ECGRecords, encoded once."""
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

    def set_trainable(self, encoder=True, projector=True, llm=False, lora=True):
        """Freeze or unfreeze each part (the curriculum's stages differ only in this)."""
        for module, on in [(self.encoder, encoder), (self.projector, projector)]:
            for p in module.parameters():
                p.requires_grad_(on)
        for name, p in self.llm.named_parameters():
            p.requires_grad_(lora if ".lora_" in name else llm)

    # ---- one folder: config.json + model.safetensors + tokenizer, LLaVA-style
    def save(self, out_dir):
        """The LLM part is a plain Hugging Face Llama (LoRA merged) that transformers reads; the other parts sit
        beside it under their prefixes (ecg_encoder.*, ecg_projector.*), their settings under "nanoecg"."""
        extra = {f"{prefix}{k}": v for prefix, module in self.parts().items() for k, v in module.state_dict().items()}
        save_pretrained(self.llm, out_dir, extra_tensors=extra, extra_config={"nanoecg": self.settings()})
        self.tokenizer.save(out_dir)

    def parts(self):
        """{weight-name prefix: module} of everything beside the LLM in the checkpoint."""
        return {"ecg_encoder.": self.encoder, "ecg_projector.": self.projector}

    def settings(self):
        """What load() needs beside the weights to build this model again."""
        return {"encoder": asdict(self.encoder.cfg), "max_seq_len": self.max_seq_len,
                "chat_format": self.format.name, "label_ecgs": self.label_ecgs, "ecg_seconds": self.ecg_seconds,
                "name_last_ecg": self.name_last_ecg}

    SECTIONS = {"encoder": EncoderConfig}   # the settings sections that are a part's config (check_settings)

    @classmethod
    def from_settings(cls, llm, tokenizer, settings, **parts):
        """The model a folder's "nanoecg" settings describe, with untrained parts beside the LLM (load fills them)."""
        return cls(llm, ECGEncoder(saved_encoder_config(settings["encoder"])), tokenizer, settings.get("max_seq_len"),
                   settings.get("chat_format", "auto"), settings.get("label_ecgs", False),
                   ecg_seconds=settings.get("ecg_seconds", False),
                   name_last_ecg=settings.get("name_last_ecg", False), **parts)

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
        check_settings(raw["nanoecg"], cls.SECTIONS, d / "config.json")   # before the LLM's weights are read
        llm = LLM.from_pretrained(d, dtype=dtype, device=device)
        model = cls.from_settings(llm, Tokenizer(d), raw["nanoecg"])
        for module in model.parts().values():
            module.to(llm.embed_tokens.weight.device, llm.embed_tokens.weight.dtype)
        model._load_parts(d / "model.safetensors")
        return model.eval()

    def _load_parts(self, path):
        """The parts beside the LLM from the checkpoint file; a mismatch is one error naming file and keys, and so are
        weights that belong to no part of this model."""
        prefixes = tuple(self.parts())
        with safe_open(str(path), framework="pt") as f:
            other = sorted({".".join(k.split(".")[:1 + k.startswith("model.")]) + ".*" for k in f.keys()
                            if not k.startswith(prefixes) and not is_llm_key(k)})
            if other:
                raise ValueError(f"{path}: weights {other} belong to no part of this model (one trained with "
                                 "--images loads with images.chat.load_chat)")
            for prefix, module in self.parts().items():
                state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
                load_state(module, state, f"{path} ({prefix}*)")


def check_settings(settings, sections, path):
    """Each part's config in a checkpoint's "nanoecg" settings names only fields its config class has (a ValueError
    naming the file and the key, as config.py words it), and is there."""
    for name, config_class in sections.items():
        if not isinstance(settings.get(name), dict):
            raise ValueError(f"{path}: no nanoecg.{name} section (the {config_class.__name__} of the model)")
        names = [f.name for f in fields(config_class)]
        for key in settings[name]:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; {config_class.__name__} has {names}"
                raise ValueError(f"{path}: unknown config key {key!r} under nanoecg.{name}{hint}")


def token_width(encoder):
    """The width of an encoder's tokens: its d_model, or the d_llm of one that projects its own (anyECG's)."""
    return getattr(encoder, "d_llm", None) or encoder.cfg.d_model


def check_widths(encoder, projector, llm):
    """The parts join where their widths agree: encoder -> projector -> LLM. A wider token would not fail later:
    masked_scatter would take its first elements, and the model would answer from garbage."""
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]   # none: nn.Identity passes its input on
    enc, hidden = token_width(encoder), llm.config.hidden_size
    p_in, p_out = (linears[0].in_features, linears[-1].out_features) if linears else (enc, enc)
    if p_in != enc:
        raise ValueError(f"the ECG encoder ({type(encoder).__name__}) gives {enc}-wide tokens, but the projector "
                         f"({type(projector).__name__}) takes {p_in}-wide ones")
    if p_out != hidden:
        what = f"projector ({type(projector).__name__})" if linears else f"ECG encoder ({type(encoder).__name__})"
        raise ValueError(f"the {what} gives {p_out}-wide tokens, but the LLM's hidden size is {hidden}")


def _run_lengths(flags):
    """[F, T, T, F, T] -> [2, 1]: lengths of the runs of True values."""
    return [len(list(run)) for flag, run in itertools.groupby(flags) if flag]
