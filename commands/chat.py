"""`qlora chat`: a multi-turn conversation with base + adapter in the terminal, tokens streamed as
they come. One line is one user message; /reset, /system TEXT; Ctrl-C stops an answer; Ctrl-D (end of
input) or Ctrl-C at the prompt leaves. Works the same from a script (`printf 'hi\\n/reset\\n' | qlora
chat RUN`): prompts go to stderr."""

from __future__ import annotations

import sys

from commands.generate import answer, inference_options, load, stdin
from common.after_training.prompting import ChatSession, TextStream
from common.console import Say
from common.errors import Terminated, UsageError

HELP = ("type a message; /reset clears the conversation, /system TEXT sets the system prompt, Ctrl-C stops an "
        "answer, Ctrl-D leaves")


def add_parser(sub) -> None:
    p = sub.add_parser("chat", parents=[inference_options()], help="chat with a trained adapter in the terminal")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    note = Say(sys.stderr)
    lines = stdin("chat")
    model, tokenizer = load(args, note)
    session = ChatSession(tokenizer, args.system)
    note.info(HELP)
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = lines.readline()
        if not line:  # Ctrl-D or the end of a script
            sys.stderr.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/reset":
            session.reset()
            note.info("conversation cleared")
        elif text.startswith("/system"):
            session.system = text.removeprefix("/system").strip() or None
            note.info(f"system prompt {'set' if session.system else 'removed'}")
        elif text.startswith("/"):
            note.warn(f"unknown command {text.split()[0]}; {HELP}")
        else:
            try:
                said = reply(model, tokenizer, session, text, args)
            except UsageError as exc:  # this message cannot be answered (too long, not encodable); the chat goes on
                note.warn(str(exc))
                continue
            if said is None:
                note.warn("answer stopped (Ctrl-C); that exchange is left out of the conversation. "
                          "Ctrl-C at the prompt or Ctrl-D leaves.")
            else:
                session.add(text, said)


def reply(model, tokenizer, session: ChatSession, text: str, args) -> str | None:
    """The streamed answer, or None when Ctrl-C stopped it: that stops the answer, not the chat."""
    sys.stderr.write("model> ")
    sys.stderr.flush()
    stream = TextStream(tokenizer, _write)
    try:
        result = answer(model, tokenizer, session.prompt_ids(text), args, on_token=stream)
    except Terminated:
        raise
    except KeyboardInterrupt:
        result = None
    _write("\n")
    return result.text if result else None


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
