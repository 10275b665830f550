//! sim_vfio (to be written)
