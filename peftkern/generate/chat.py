"""An interactive chat in the terminal: the conversation goes through the tokenizer's chat template,
the answer is printed as it is generated, and a few slash commands steer the session."""
from __future__ import annotations

import contextlib

from peftkern.generate.prompts import PromptError
from peftkern.generate.settings import DecodingSettings
from peftkern.generate.text import generate

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system message and reset), "
        "/adapter on|off, /help, /quit")
USER_PROMPT = "you> "
BOT_PROMPT = "bot> "


class ChatSession:
    def __init__(self, model, tokenizer, settings: DecodingSettings, system: str | None = None, processors=(),
                 scorer=None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise PromptError("peftkern chat needs a tokenizer with a chat template; this one has none")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.processors, self.scorer = list(processors), scorer
        self.system = system
        self.adapters_on = True
        self.messages: list[dict] = []

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def command(self, line: str, out) -> bool:
        """Handle a slash command; False to quit."""
        name, _, rest = line[1:].partition(" ")
        if name in ("quit", "exit"):
            return False
        if name == "reset":
            self.messages = []
            print("(conversation reset)", file=out)
        elif name == "system":
            self.system = rest.strip() or None
            self.messages = []
            print(f"(system message {'set' if self.system else 'cleared'}; conversation reset)", file=out)
        elif name == "adapter":
            if not hasattr(self.model, "disable_adapter"):
                print("(no adapter is loaded)", file=out)
            elif rest.strip() in ("on", "off"):
                self.adapters_on = rest.strip() == "on"
                print(f"(adapters {'on' if self.adapters_on else 'off'})", file=out)
            else:
                print("(usage: /adapter on|off)", file=out)
        else:
            print(HELP, file=out)
        return True

    def reply(self, text: str, out) -> str:
        """Generate the answer to ``text``, streaming it to ``out``; drops the oldest turns when the
        conversation no longer fits the model's context."""
        self.messages.append({"role": "user", "content": text})
        while True:
            try:
                return self._answer(out)
            except PromptError as exc:
                if "context" not in str(exc) or len(self.messages) <= 1:
                    self.messages.pop()
                    raise
                self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]

    def _answer(self, out) -> str:
        off = self.model.disable_adapter() if (not self.adapters_on and hasattr(self.model, "disable_adapter")) \
            else contextlib.nullcontext()
        printed = []

        def show(_, piece):
            if not printed:
                out.write(BOT_PROMPT)
            printed.append(piece)
            out.write(piece)
            out.flush()

        with off:
            done = generate(self.model, self.tokenizer, [self.conversation()], self.settings,
                            processors=self.processors, scorer=self.scorer, on_text=show)[0]
        if not printed:
            out.write(BOT_PROMPT)
        out.write("\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": done.text})
        return done.text

    def run(self, stdin, out) -> int:
        print(f"peftkern chat ({HELP})", file=out)
        while True:
            out.write(USER_PROMPT)
            out.flush()
            line = stdin.readline()
            if not line:
                out.write("\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    return 0
                continue
            try:
                self.reply(line, out)
            except PromptError as exc:
                print(f"(error: {exc})", file=out)
