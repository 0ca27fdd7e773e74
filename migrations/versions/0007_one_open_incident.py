"""One open incident per topic, even with several replicas: ``incidents.open_topic`` (unique).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

The topic while the incident takes escalations, NULL once a later burst of the topic started a new one.
Two replicas starting the same topic's incident at once: the unique index refuses the second, which then
threads its escalation under the first. Incidents from before this step count as closed.

Frozen copy of the schema: it does not import the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("open_topic", sa.String(length=128), nullable=True))
    op.create_index("ux_incidents_open_topic", "incidents", ["open_topic"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_incidents_open_topic", table_name="incidents")
    with op.batch_alter_table("incidents") as batch:
        batch.drop_column("open_topic")
