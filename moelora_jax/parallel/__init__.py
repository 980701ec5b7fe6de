"""Devices and processes: meshes and logical axes, multi-process jobs, accelerator topologies, and what a compiled
program computes and communicates."""
