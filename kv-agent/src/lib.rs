//! The kvx agent an inference server embeds
