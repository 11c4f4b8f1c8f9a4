"""
generate.py — sampling from the LLM (and, through it, the ECG-chat model).

  left_pad         a batch of prompts of different lengths -> (ids, attention_mask), padded on
                   the left so every prompt's last token sits in the last column
  sample_next      greedy / temperature / top-k / top-p choice of the next token
  generate         prefill once, then decode token by token through the KV cache; stops on
                   EOS or stop strings; streams new text through a callback
  the chat         `python generate.py --ckpt DIR --ecg PATH [--ecg PATH ...] --prompt "..."`:
                   any record data.load_ecg reads, a lead subset and a part of a long record,
                   sampling options, streamed output, multi-turn chat from stdin when there is
                   no --prompt, and --plot out.svg with the localized intervals shaded

A left-padded batch gives exactly the tokens each prompt gives alone: padding is masked out of
attention and RoPE positions are counted over real tokens only (see model.LLM.forward).
"""

import os
import sys
import warnings

import torch


def left_pad(prompts, pad_id):
    """list of token-id lists -> ids (B, T) and attention_mask (B, T), 1 on real tokens."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        if p:
            ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, T - len(p):] = 1
    return ids, mask


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p                          # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(llm, input_ids, attention_mask=None, *, inputs_embeds=None, max_new_tokens=64,
             temperature=0.0, top_k=None, top_p=None, stop_ids=(), stop_strings=(), tokenizer=None,
             on_text=None, generator=None):
    """Continue a (left-padded) batch of prompts. Returns the new tokens of each row, cut before
    the stop token / stop string.

    input_ids (B, T), attention_mask (B, T); inputs_embeds (B, T, C) replaces the embeddings of
    input_ids for the prompt (the ECG-chat model passes prompts with ECG tokens spliced in).
    stop_strings need a tokenizer. on_text(row, text) is called with each piece of new text.
    """
    B, T = input_ids.shape
    device = llm.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    llm.setup_cache(B, T + max_new_tokens)
    try:
        logits = llm(input_ids if inputs_embeds is None else None, inputs_embeds=inputs_embeds,
                     attention_mask=attention_mask, start_pos=0, last_only=True)[:, -1]   # (B, V)
        new = [[] for _ in range(B)]
        done = [False] * B
        printed = [""] * B  # text already streamed per row
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)           # (B,)
            for b in range(B):
                if done[b]:
                    continue
                tok = int(nxt[b])
                if tok in stop_ids:
                    done[b] = True
                    continue
                new[b].append(tok)
                if tokenizer is not None and (on_text or stop_strings):
                    text = tokenizer.decode(new[b])
                    hit = [text.index(s) for s in stop_strings if s in text]
                    if hit:
                        done[b] = True
                        text = text[:min(hit)]
                    if on_text and len(text) > len(printed[b]) and not text.endswith("\ufffd"):
                        on_text(b, text[len(printed[b]):])
                        printed[b] = text
            if all(done) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            logits = llm(nxt[:, None], attention_mask=attention_mask, start_pos=T + step)[:, -1]
    finally:
        llm.clear_cache()
    if stop_strings and tokenizer is not None:
        new = [_cut_at_stop(row, tokenizer, stop_strings) for row in new]
    return new


def _cut_at_stop(tokens, tokenizer, stop_strings):
    # drop trailing tokens until the decoded text no longer contains a stop string
    while tokens and any(s in tokenizer.decode(tokens) for s in stop_strings):
        tokens = tokens[:-1]
    return tokens


# -----------------------------------------------------------------------------
# the command-line chat
#
#   python generate.py --ckpt DIR --ecg PATH [--ecg PATH ...] --prompt "..."   one answer, streamed
#   python generate.py --ckpt DIR --ecg PATH                                    multi-turn, from stdin
#
# stdout carries only the answers (so they can be piped); everything else goes to stderr.


def cut_seconds(rec, start=0.0, end=None, name="ECG"):
    """The part [start, end) seconds of a record (end None: to its end). A start past the
    end is an error; an end past it is clipped with a warning."""
    from data import ECGRecord
    duration = rec.signal.shape[1] / rec.fs
    if not 0 <= start < duration:
        raise ValueError(f"{name}: --start {start:g} s is outside the record, which is {duration:.2f} s long")
    if end is not None and end <= start:
        raise ValueError(f"{name}: --end {end:g} s must be after --start {start:g} s")
    if end is not None and end > duration:
        warnings.warn(f"{name}: --end {end:g} s is past the end of the record; using its end, {duration:.2f} s")
        end = None
    a, b = round(start * rec.fs), rec.signal.shape[1] if end is None else round(end * rec.fs)
    return ECGRecord(rec.signal[:, a:b], rec.fs, rec.leads)


def lead_list(text, option):
    """'I,ii,MLII' -> canonical lead names, or an error naming the one that is not a lead."""
    from data import STANDARD_LEADS, canonical_lead
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if canonical_lead(x) is None]
    if bad:
        raise ValueError(f"{option}: {bad} are not ECG lead names; use {', '.join(STANDARD_LEADS)}")
    return [canonical_lead(x) for x in names]


def read_ecgs(paths, fs_model, leads=None, start=0.0, end=None, fs=None, lead_names=None):
    """Each --ecg -> (record as read and cut, in mV at its own rate; record as the model
    reads it, at fs_model). Every error names the file."""
    from data import load_ecg, prepare_ecg
    out = []
    for path in paths:
        rec = cut_seconds(load_ecg(path, leads=leads, fs=fs, lead_names=lead_names), start, end, path)
        out.append((rec, prepare_ecg(rec, fs_model, name=path)))
    return out


def chat_turn(model, turns, ecgs, max_new_tokens=256, on_text=None, images=(), **sampling):
    """One assistant answer to the conversation `turns` ([("user", text), ("assistant",
    text), ..., ("user", question)]) about `ecgs` (ECGRecords at the model's rate) and
    `images` (paper ECGs, uint8 RGB). The oldest exchanges are forgotten when the history
    outgrows the context (the ECGs always stay). -> (answer, number of exchanges forgotten)"""
    from data import encode_chat
    counts = [model.encoder.num_tokens(e.signal.shape[1]) for e in ecgs]
    n_img = [model.image_encoder.num_tokens] * len(images) if images else []
    forgotten = 0
    while True:
        ids, _ = encode_chat(model.tokenizer, turns[2 * forgotten:], counts, add_generation_prompt=True,
                             image_token_counts=n_img)
        if len(ids) + max_new_tokens <= model.max_seq_len or 2 * forgotten + 1 >= len(turns):
            break
        forgotten += 1
    model.check_fits([e.signal.shape[1] for e in ecgs], len(ids) - sum(counts) + 1)   # clear error if not
    inputs = [(torch.as_tensor(e.signal), list(e.leads)) for e in ecgs]
    new = model.generate([ids], [inputs], images=[[torch.as_tensor(im) for im in images]],
                         max_new_tokens=min(max_new_tokens, model.max_seq_len - len(ids)),
                         on_text=(lambda row, text: on_text(text)) if on_text else None, **sampling)
    return model.tokenizer.decode(new[0]).strip(), forgotten


def plot_answer(path, rec, model_leads, answer, name, start=0.0):
    """Draw the first ECG (as recorded, the leads the model read) with the intervals the
    answer localizes shaded. Times are seconds from the start of the part shown."""
    from data import parse_localization, plot_ecg_svg
    duration = rec.signal.shape[1] / rec.fs
    spans = [(max(0.0, a), min(duration, b)) for a, b in parse_localization(answer) or [] if a < duration]
    rows = [rec.leads.index(x) for x in model_leads]
    where = f" from {start:g} s" if start else ""
    short = "".join(c for c in answer if c.isprintable())   # control characters are not valid XML
    short = short if len(short) <= 90 else short[:87] + "..."
    plot_ecg_svg(rec.signal[rows], rec.fs, model_leads, path, intervals=spans,
                 title=f"{os.path.basename(name)}{where}: {short}")
    return spans


def _stream(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def _user_lines():
    """Questions from stdin, one a line; a prompt shows only when a person is typing."""
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip().lower() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()


def run_chat(args):
    from model import ECGChat
    model = ECGChat.load(args.ckpt, device=args.device)
    leads = lead_list(args.leads, "--leads") if args.leads else None
    lead_names = [x.strip() for x in args.lead_names.split(",")] if args.lead_names else None
    read = read_ecgs(args.ecg or [], model.encoder.cfg.fs, leads, args.start, args.end, args.fs, lead_names)
    ecgs = [prepared for _, prepared in read]
    if args.image and model.image_encoder is None:
        sys.exit(f"error: {args.ckpt} has no image encoder (train one with train.py --images)")
    from paper import read_image
    images = [read_image(path) for path in args.image or []]
    for path, im in zip(args.image or [], images):
        print(f"image {path}: {im.shape[1]} x {im.shape[0]} px -> {model.image_encoder.num_tokens} tokens",
              file=sys.stderr)
    for path, (rec, e) in zip(args.ecg or [], read):
        print(f"ECG {path}: {rec.signal.shape[1] / rec.fs:.1f} s at {rec.fs:g} Hz, leads {' '.join(e.leads)} "
              f"-> {model.encoder.num_tokens(e.signal.shape[1])} tokens", file=sys.stderr)
    model.check_fits([e.signal.shape[1] for e in ecgs], 16)   # fail before the first question, not after
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.seed is not None:
        sampling["generator"] = torch.Generator(model.llm.embed_tokens.weight.device).manual_seed(args.seed)
    questions = [args.prompt] if args.prompt else _user_lines()
    if not args.prompt and sys.stdin.isatty():
        print("Ask about the ECG(s); an empty line is ignored, 'exit' or Ctrl-D ends.", file=sys.stderr)
    turns = []
    for question in questions:
        turns.append(("user", question))
        answer, forgotten = chat_turn(model, turns, ecgs, args.max_new_tokens, on_text=_stream, images=images,
                                      **sampling)
        _stream("\n")
        if forgotten:
            print(f"(context full: the oldest {forgotten} exchange(s) were left out)", file=sys.stderr)
        turns = turns[2 * forgotten:] + [("assistant", answer)]
        if args.plot and ecgs:
            spans = plot_answer(args.plot, read[0][0], ecgs[0].leads, answer, args.ecg[0], args.start)
            print(f"plot: {args.plot} ({len(spans)} interval(s) shaded)", file=sys.stderr)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="generate.py", description="Chat with a nanoECG checkpoint about ECGs.")
    p.add_argument("--ckpt", required=True, help="checkpoint folder (what train.py writes)")
    p.add_argument("--image", action="append", help="a paper ECG as PNG/JPEG (needs Pillow; repeatable); "
                   "a model trained with train.py --images reads it alone or with --ecg")
    p.add_argument("--ecg", action="append",
                   help="an ECG: WFDB record, .npy or .csv; repeat for several ECGs, in order")
    p.add_argument("--prompt", help="the question; without it, a multi-turn chat reads questions from stdin")
    p.add_argument("--leads", help="use only these leads, e.g. I,II,V5")
    p.add_argument("--start", type=float, default=0.0, help="seconds: use the record from here ...")
    p.add_argument("--end", type=float, default=None, help="... to here (default: its end)")
    p.add_argument("--fs", type=float, help="sampling rate of a .npy / time-less .csv file, Hz")
    p.add_argument("--lead-names", help="lead names of a .npy file (or to override a file's), e.g. I,II,III")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    p.add_argument("--plot", help="write the first ECG as SVG, with the intervals the answer localizes shaded")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.ecg and not args.image:
        p.error("give at least one --ecg (or --image)")
    try:
        run_chat(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")   # a bad input gets one line naming the file, not a traceback
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
