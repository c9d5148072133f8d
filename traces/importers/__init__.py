"""Importers from public trace formats into trace format v1."""
