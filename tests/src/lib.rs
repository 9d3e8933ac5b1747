//! Shared helpers live in the test files.
