//! The bus over Redis (written in the next step).
