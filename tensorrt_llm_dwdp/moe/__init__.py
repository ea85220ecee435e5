"""Mixture-of-Experts layer: routers, permutation plan, multi-tensor expert weights, backends."""
