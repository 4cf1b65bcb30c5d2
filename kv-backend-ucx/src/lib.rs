//! UCX backend for kvx (libucp opened at run time)
