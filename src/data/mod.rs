//! JSONL record types and importers.
