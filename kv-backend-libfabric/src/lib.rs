//! libfabric backend for kvx (libfabric.so.1 opened at run time)
