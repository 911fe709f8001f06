"""The papers' published numbers that the experiments print beside their own."""

from __future__ import annotations

# A-MAML Table 1 (50 inner GD steps; MAML 5) and Table 2 (100 steps; MAML 10):
# meta-test nRMSE, mean ± std over 100 test tasks.
# {table: {dataset: {setting: {method: (mean, std)}}}}
T12_METHODS = ("amaml", "imaml", "maml", "fomaml", "reptile")
_T12_RAW = {
    1: {
        "jester": [(0.074, 0.005, 0.027, 0.002), (0.114, 0.007, 0.050, 0.003), (0.120, 0.001, 0.036, 0.000),
                   (0.292, 0.012, 0.115, 0.004), (0.270, 0.012, 0.106, 0.004)],
        "movielens": [(0.053, 0.005, 0.023, 0.003), (0.082, 0.004, 0.033, 0.002), (0.123, 0.001, 0.050, 0.003),
                      (0.174, 0.008, 0.068, 0.004), (0.166, 0.008, 0.063, 0.003)],
        "movielens-1m": [(0.094, 0.008, 0.035, 0.004), (0.138, 0.010, 0.052, 0.004), (0.140, 0.002, 0.059, 0.001),
                         (0.270, 0.011, 0.104, 0.006), (0.266, 0.011, 0.101, 0.006)],
    },
    2: {
        "jester": [(0.069, 0.005, 0.044, 0.003), (0.190, 0.010, 0.103, 0.005), (0.154, 0.001, 0.061, 0.002),
                   (0.273, 0.012, 0.077, 0.004), (0.290, 0.012, 0.100, 0.004)],
        "movielens": [(0.057, 0.006, 0.021, 0.002), (0.168, 0.007, 0.046, 0.002), (0.123, 0.001, 0.050, 0.002),
                      (0.191, 0.007, 0.071, 0.004), (0.171, 0.008, 0.066, 0.004)],
        "movielens-1m": [(0.105, 0.009, 0.035, 0.004), (0.130, 0.007, 0.045, 0.004), (0.197, 0.002, 0.083, 0.001),
                         (0.395, 0.010, 0.119, 0.005), (0.408, 0.011, 0.128, 0.006)],
    },
}
PAPER_AMAML_TABLE12 = {
    table: {
        ds: {
            "10shot-15val": {m: (r[0], r[1]) for m, r in zip(T12_METHODS, rows)},
            "20shot-30val": {m: (r[2], r[3]) for m, r in zip(T12_METHODS, rows)},
        }
        for ds, rows in per_ds.items()
    }
    for table, per_ds in _T12_RAW.items()
}

# A-MAML Table 3: meta-test accuracy (%) ± 95% CI.
PAPER_AMAML_TABLE3 = {
    "omniglot": {"MAML": (95.8, 0.3), "FOMAML": (89.4, 0.5), "Reptile": (89.43, 0.14),
                 "iMAML-GD": (94.46, 0.42), "iMAML-HF": (96.18, 0.36),
                 "A-MAML (T=0.5)": (96.36, 0.39), "A-MAML (T=1.0)": (96.79, 0.34)},
    "miniimagenet": {"MAML": (48.70, 1.84), "FOMAML": (48.07, 1.75), "Reptile": (49.97, 0.32),
                     "iMAML-GD": (48.96, 1.84), "iMAML-HF": (49.30, 1.88),
                     "A-MAML (T=0.5)": (49.43, 1.64), "A-MAML (T=1.0)": (49.47, 1.77)},
}

# A-MAML Table 5: relative L2 error of the A-MAML meta-gradient on CosMixture
# against the 1000-state gradient, mean ± std over 20 random initialisations.
PAPER_AMAML_TABLE5 = {
    0.1: {10: (7.62e-4, 2.04e-4), 20: (3.55e-4, 9.49e-5), 50: (1.33e-4, 3.55e-5), 100: (6.24e-5, 1.67e-5),
          200: (2.76e-5, 7.34e-6), 500: (6.87e-6, 1.83e-6)},
    0.3: {10: (4.82e-3, 9.07e-4), 20: (2.26e-3, 4.21e-4), 50: (8.63e-4, 1.61e-4), 100: (4.19e-4, 7.79e-5),
          200: (2.01e-4, 3.74e-5), 500: (7.16e-5, 1.33e-5)},
    0.5: {10: (1.17e-2, 2.17e-3), 20: (5.46e-3, 1.01e-3), 50: (2.09e-3, 3.85e-4), 100: (1.03e-3, 1.88e-4),
          200: (4.99e-4, 9.16e-5), 500: (1.87e-4, 3.42e-5)},
}

# COMLN Table 2 (Conv-4 and ResNet-12 rows, miniImageNet 5-way): accuracy (%) ± 95% CI.
PAPER_COMLN_TABLE2 = {
    "conv4": {"maml": {1: (48.70, 1.84), 5: (63.11, 0.92)}, "anil": {1: (46.30, 0.40), 5: (61.00, 0.60)},
              "comln": {1: (53.01, 0.62), 5: (70.54, 0.54)}},
    "resnet12": {"maml": {1: (49.92, 0.65), 5: (63.93, 0.59)}, "anil": {1: (49.65, 0.65), 5: (59.51, 0.56)},
                 "comln": {1: (59.26, 0.65), 5: (77.26, 0.49)}},
}

# COMLN Table 4 (Appendix E.1): miniImageNet 5-way, Conv-4, accuracy (%) ± 95% CI.
PAPER_COMLN_TABLE4 = {"dopri5": {1: (53.01, 0.62), 5: (70.54, 0.54)}, "euler": {1: (53.00, 0.83), 5: (70.50, 0.72)}}
