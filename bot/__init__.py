"""Slack bot: event handlers, storage, scheduler and the `triage` command line."""
