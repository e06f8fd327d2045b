"""The database: schema, the single writer, queries and migrations."""
