//! Storage backend for kvx: io_uring with O_DIRECT, cuFile where present
