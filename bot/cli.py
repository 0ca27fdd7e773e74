"""The ``triage`` command line: one app, with the classifier's commands and the bot's own."""

from __future__ import annotations

import typer

from classifier.cli import register as register_classifier_commands

app = typer.Typer(
    name="triage",
    help="Triage customer messages in Slack with a fine-tuned multi-head BERT classifier.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register_classifier_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
