//! The store over Redis (written in a later step).
