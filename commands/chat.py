"""`qlora chat`: a multi-turn conversation with base + adapter in the terminal, tokens streamed as
they come. One line is one user message; /reset, /system TEXT; Ctrl-C stops an answer; Ctrl-D (end of
input) or Ctrl-C at the prompt leaves. Works the same from a script (`printf 'hi\\n/reset\\n' | qlora
chat RUN`): prompts go to stderr."""

from __future__ import annotations

import sys

from commands.generate import answer, inference_options, load, stdin
from commands.options import library_log
from common.after_training.prompting import ChatSession, TextStream, read_tools
from common.console import Say
from common.errors import Terminated, UsageError

HELP = ("type a message; /reset clears the conversation, /system TEXT sets the system prompt, Ctrl-C stops an "
        "answer, Ctrl-D leaves")


def add_parser(sub) -> None:
    p = sub.add_parser("chat", parents=[inference_options()], help="chat with a trained adapter in the terminal")
    p.set_defaults(handler=run)


def run(args, say: Say) -> int:
    note = Say(sys.stderr)
    tools = read_tools(args.tools)
    lines = stdin("chat")
    streams = (sys.stdout, sys.stderr)  # the conversation's; library output goes to the log meanwhile
    with library_log(args, "chat", note):
        model, tokenizer = load(args, note)
        converse(model, tokenizer, ChatSession(tokenizer, args.system, tools), args, note, (lines, *streams))
    return 0


def converse(model, tokenizer, session: ChatSession, args, note: Say, streams) -> None:
    lines, out, err = streams
    note.info(HELP)
    while True:
        err.write("you> ")
        err.flush()
        line = lines.readline()
        if not line:  # Ctrl-D or the end of a script
            err.write("\n")
            return
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
                said = reply(model, tokenizer, session, text, args, (out, err))
            except UsageError as exc:  # this message cannot be answered (too long, not encodable); the chat goes on
                note.warn(str(exc))
                continue
            if said is None:
                note.warn("answer stopped (Ctrl-C); that exchange is left out of the conversation. "
                          "Ctrl-C at the prompt or Ctrl-D leaves.")
            else:
                session.add(text, said)


def reply(model, tokenizer, session: ChatSession, text: str, args, streams) -> str | None:
    """The streamed answer, or None when Ctrl-C stopped it: that stops the answer, not the chat."""
    out, err = streams
    err.write("model> ")
    err.flush()

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        result = answer(model, tokenizer, session.prompt_ids(text), args, on_token=TextStream(tokenizer, write))
    except Terminated:
        raise
    except KeyboardInterrupt:
        result = None
    if result is not None and result.tool_calls is not None:  # the call as `generate --tools` prints it
        write("\n" + result.shown())
    write("\n")
    return result.text if result else None
