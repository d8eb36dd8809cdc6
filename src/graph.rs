//! The stage DAG.
