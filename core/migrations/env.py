"""Alembic environment: runs against the engine gpuherd hands over (core.db.upgrade)."""

from alembic import context
from sqlmodel import SQLModel

from gpuherd.core import models  # noqa: F401  (registers the tables on SQLModel.metadata)

target_metadata = SQLModel.metadata
config = context.config
engine = config.attributes.get("engine")
if engine is None:  # plain `alembic` CLI use: take the URL from gpuherd's settings
    from gpuherd.core.config import load_settings
    from gpuherd.core.db import make_engine

    engine = make_engine(load_settings().resolved_database_url)

with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
