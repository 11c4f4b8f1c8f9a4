"""
generate.py — chat with a trained model about ECGs, from the command line.

    python generate.py --ckpt DIR --ecg PATH [--ecg PATH ...] --prompt "..."   one answer, streamed
    python generate.py --ckpt DIR --ecg PATH                                    multi-turn, from stdin
    python generate.py --anyecg DIR --llm LLAMA3_DIR --ecg PATH --prompt "..."  anyECG-chat's released model

Any record data.load_ecg reads (WFDB, .npy with --fs/--lead-names, .csv), a lead subset (--leads) and a part of a
long record (--start/--end, seconds), paper printouts (--image, PNG or JPEG through Pillow; a model trained with
train.py --images), sampling options, and --plot out.svg: the first ECG drawn with the intervals the answer localizes
shaded. stdout carries only the answers (so they can be piped); everything else goes to stderr. The sampling loop
itself is model.generate; anyECG-chat's release (its preprocessing, encoder, LoRA) is anyecg/release.py.
"""
import argparse
import math
import os
import sys
import warnings

import torch

from anyecg import release as anyecg
from data import (STANDARD_LEADS, ECGRecord, canonical_lead, cut_ecg, load_ecg, parse_localization, prepare_ecg,
                  record_length)
from images.chat import load_chat
from images.paper import plot_ecg_svg, read_image
from model import choose_device

ANSWER_BUDGET = 64   # tokens an ECG must leave free for the answer (or --max-new-tokens, if smaller)


def span_samples(n, fs, start=0.0, end=None, name="ECG"):
    """The samples [first, last) of the part [start, end) seconds of a record of n samples at fs Hz (end None: to its
    end). An end past the record's is taken as its end, with a warning; a part outside the record is data's error."""
    duration = n / fs
    if end is not None and end > duration and start < duration:
        warnings.warn(f"{name}: --end {end:g} s is past the end of the record; using its end, {duration:.2f} s")
        end = None
    return round(start * fs), n if end is None else round(end * fs)


def cut_seconds(rec, start=0.0, end=None, name="ECG"):
    """The part [start, end) seconds of a record (span_samples)."""
    return cut_ecg(rec, *span_samples(rec.signal.shape[1], rec.fs, start, end, name), name)


def finite(text):
    """argparse type: a finite number ('nan' and 'inf' parse as floats, but are no time or rate)."""
    x = float(text)
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


def lead_list(text, option):
    """'I,ii,MLII' -> canonical lead names, or an error naming the one that is not a lead."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if canonical_lead(x) is None]
    if bad:
        raise ValueError(f"{option}: {bad} are not ECG lead names; use {', '.join(STANDARD_LEADS)}")
    return [canonical_lead(x) for x in names]


def chat_turn(model, turns, inputs, max_new_tokens=256, on_text=None, **sampling):
    """One assistant answer to the conversation `turns` ([("user", text), ("assistant", text), ..., ("user", question)])
    about `inputs` (ECGRecords at the model's rate, paper images). The oldest exchanges are forgotten when the history
    outgrows the context (the inputs always stay). -> (answer, number of exchanges forgotten)"""
    for forgotten in range(len(turns) // 2 + 1):
        only_the_question = 2 * forgotten + 1 >= len(turns)
        try:
            ids, _ = model.prompt(turns[2 * forgotten:], inputs, add_generation_prompt=True)
        except ValueError:   # does not fit at all: forget more, unless only the question is left
            if only_the_question:
                raise
            continue
        if only_the_question or len(ids) + max_new_tokens <= model.max_seq_len:
            break
    new = model.generate([ids], [inputs], max_new_tokens=min(max_new_tokens, model.max_seq_len - len(ids)),
                         on_text=(lambda row, text: on_text(text)) if on_text else None, **sampling)
    return model.tokenizer.decode(new[0]).strip(), forgotten


def plot_answer(path, rec, model_leads, answer, name, start=0.0):
    """Draw the first ECG (as recorded, the leads the model read) with the intervals the answer localizes shaded.
    Times are seconds from the start of the part shown."""
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


def header_part(path, start, end):
    """(first, last sample, fs) of the part [start, end) seconds of a WFDB record, from its header alone; None for a
    .npy/.csv file, whose length is known only once it is read (data.record_length)."""
    known = record_length(path)
    return None if known is None else (*span_samples(*known, start, end, path), known[1])


def check_room(model, samples, args):
    """ECGs of these lengths (samples at the model's rate) must leave room for a question and the answer: fail before
    the first question, not after a cut answer."""
    budget = min(args.max_new_tokens, ANSWER_BUDGET)
    try:
        model.check_fits(samples, 16 + budget)
    except ValueError as e:
        raise ValueError(f"{e} Here: --start/--end take a part of a long record, and {budget} tokens stay free for "
                         f"the answer (--max-new-tokens {args.max_new_tokens}).") from None


def read_inputs(args, model):
    """Each --ecg as (the record as read and cut, in mV at its own rate; as the model, or anyECG-chat, reads it), and
    the --image printouts, each described on stderr. Every error names the file. Of a WFDB record only the part asked
    is read, and a part too long for the context is refused from the headers, before a sample is read (a 24 h Holter
    is 9 GB); .npy/.csv files are read whole, then cut and checked."""
    leads = lead_list(args.leads, "--leads") if args.leads else None
    kw = dict(leads=leads, fs=args.fs, units=args.units,
              lead_names=[x.strip() for x in args.lead_names.split(",")] if args.lead_names else None)
    parts = [header_part(path, args.start, args.end) for path in args.ecg or []]
    fs = model.encoder.cfg.fs   # lengths at the model's rate rounded down: never stricter than the check once read
    check_room(model, [math.floor((b - a) * fs / rate) for a, b, rate in filter(None, parts) if b > a], args)
    read = []
    for path, part in zip(args.ecg or [], parts):
        rec = cut_seconds(load_ecg(path, **kw), args.start, args.end, path) if part is None else \
            load_ecg(path, start=part[0], end=part[1], **kw)
        # anyECG-chat's model reads an ECG as its own code prepares it, 12 lead slots at 100 Hz
        read.append((rec, ECGRecord(anyecg.anyecg_input(rec), 100.0, list(STANDARD_LEADS)) if args.anyecg else
                     prepare_ecg(rec, model.encoder.cfg.fs, name=path)))
    images = [read_image(path) for path in args.image or []]
    model.check_inputs(images)   # a model trained without --images reads none
    for path, im in zip(args.image or [], images):
        print(f"image {path}: {im.shape[1]} x {im.shape[0]} px -> {model.image_encoder.num_tokens} tokens",
              file=sys.stderr)
    for path, (rec, e) in zip(args.ecg or [], read):
        print(f"ECG {path}: {rec.signal.shape[1] / rec.fs:.1f} s at {rec.fs:g} Hz, leads {' '.join(e.leads)} "
              f"-> {model.encoder.num_tokens(e.signal.shape[1])} tokens", file=sys.stderr)
    if len(read) > 1 and (args.start or args.end is not None):
        print("(--start/--end took the same part of every --ecg)", file=sys.stderr)
    return read, images


def run_chat(args):
    device = choose_device(args.device)
    model = anyecg.load_chat(args.anyecg, args.llm, device=device) if args.anyecg else load_chat(args.ckpt, device=device)
    read, images = read_inputs(args, model)
    ecgs = [prepared for _, prepared in read]
    check_room(model, [e.signal.shape[1] for e in ecgs], args)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.seed is not None:
        sampling["generator"] = torch.Generator(model.llm.embed_tokens.weight.device).manual_seed(args.seed)
    questions = [args.prompt] if args.prompt else _user_lines()
    if not args.prompt and sys.stdin.isatty():
        print("Ask about the ECG(s); an empty line is ignored, 'exit' or Ctrl-D ends.", file=sys.stderr)
    turns = []
    for question in questions:
        turns.append(("user", question))
        answer, forgotten = chat_turn(model, turns, ecgs + images, args.max_new_tokens, on_text=_stream, **sampling)
        _stream("\n")
        if forgotten:
            print(f"(context full: the oldest {forgotten} exchange(s) were left out)", file=sys.stderr)
        turns = turns[2 * forgotten:] + [("assistant", answer)]
        if args.plot and ecgs:
            spans = plot_answer(args.plot, read[0][0], ecgs[0].leads, answer, args.ecg[0], args.start)
            print(f"plot: {args.plot} ({len(spans)} interval(s) shaded)", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(prog="generate.py", description="Chat with a nanoECG checkpoint about ECGs.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="checkpoint folder (what train.py writes)")
    which.add_argument("--anyecg", help="anyECG-chat's released checkpoint folder (ecg_model.pth, projection.pth, "
                       "the LoRA adapter); needs --llm")
    p.add_argument("--llm", help="with --anyecg: the Meta-Llama-3-8B-Instruct folder it was trained on")
    p.add_argument("--image", action="append", help="a paper ECG as PNG/JPEG (needs Pillow; repeatable); "
                   "a model trained with train.py --images reads it alone or with --ecg")
    p.add_argument("--ecg", action="append",
                   help="an ECG: WFDB record, .npy or .csv; repeat for several ECGs, in order")
    p.add_argument("--prompt", help="the question; without it, a multi-turn chat reads questions from stdin")
    p.add_argument("--leads", help="use only these leads, e.g. I,II,V5")
    p.add_argument("--start", type=finite, default=0.0, help="seconds: use each --ecg from here ...")
    p.add_argument("--end", type=finite, default=None,
                   help="... to here (default: its end); the same part of every --ecg")
    p.add_argument("--fs", type=finite, help="sampling rate of a .npy / time-less .csv file, Hz")
    p.add_argument("--lead-names", help="lead names of a .npy file (or to override a file's), e.g. I,II,III")
    p.add_argument("--units", choices=["mV", "uV", "V"], help="unit of the file's values (default: the WFDB header's; "
                   "mV for .npy/.csv); a file in µV read as mV is warned about")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    p.add_argument("--plot", help="write the first ECG as SVG, with the intervals the answer localizes shaded")
    p.add_argument("--device", default="auto", help="auto (CUDA, then Apple's MPS, then the CPU) | cpu | cuda | mps")
    args = p.parse_args(argv)
    if not args.ecg and not args.image:
        p.error("give at least one --ecg (or --image)")
    if args.prompt is not None and not args.prompt.strip():   # '' would silently turn into a chat from stdin
        p.error("--prompt is empty; give a question, or leave --prompt out to ask from stdin")
    if bool(args.anyecg) != bool(args.llm):
        p.error("--anyecg and --llm go together")
    try:
        run_chat(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")   # a bad input gets one line naming the file, not a traceback
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
