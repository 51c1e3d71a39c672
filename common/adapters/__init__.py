"""LoRA adapters between mlx-lm and PEFT: conversion as pure functions, and verification by outputs."""
