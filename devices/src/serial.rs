//! serial (to be written)
