//! The CLI's parts: its arguments, its output, and the commands that need more than a request.

pub mod args;
pub mod events;
pub mod output;
pub mod vm;
