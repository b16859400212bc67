# lme4's fits of formulas written the way users write them (issue: real formulas), for tests/test_formula.py.
# Writes formula_reference.json and the data sets it needs (cake.csv, Alfalfa.csv) beside this script.
suppressMessages({library(lme4); library(nlme); library(jsonlite)})
here <- dirname(normalizePath(sub("--file=", "", grep("--file=", commandArgs(FALSE), value = TRUE))))
out <- if (length(commandArgs(TRUE))) commandArgs(TRUE)[1] else file.path(here, "formula_reference.json")
sleep <- read.csv(file.path(here, "..", "..", "lmm_symbolic", "datasets", "data", "sleepstudy.csv"))
sleep$Subject <- factor(sleep$Subject)
cake <- as.data.frame(lme4::cake)
write.csv(cake, file.path(here, "cake.csv"), row.names = FALSE)
alf <- as.data.frame(nlme::Alfalfa)
write.csv(alf, file.path(here, "Alfalfa.csv"), row.names = FALSE)
alf <- read.csv(file.path(here, "Alfalfa.csv"), stringsAsFactors = TRUE)
cake <- read.csv(file.path(here, "cake.csv"), stringsAsFactors = TRUE)
cake$temperature <- factor(cake$temperature, levels = levels(lme4::cake$temperature), ordered = TRUE)
opt <- read.csv(file.path(here, "optimum_cases.csv")); opt$g <- factor(opt$g)   # simulated: see test_formula.py
sleep$w <- rep(c(1, 2, 3), 60)
sleep$Days2 <- sleep$Days; sleep$Days2[c(3, 50)] <- NA
cases <- list(
  list(id = "I_power", data = "sleep", formula = "Reaction ~ I(Days^2) + Days + (1|Subject)"),
  list(id = "factor", data = "sleep", formula = "Reaction ~ factor(Days) + (1|Subject)"),
  list(id = "as_factor_slope", data = "sleep", formula = "Reaction ~ as.factor(Days > 4) * Days + (Days|Subject)"),
  list(id = "log_response", data = "sleep", formula = "log(Reaction) ~ Days + (Days|Subject)"),
  list(id = "sqrt_response", data = "sleep", formula = "sqrt(Reaction) ~ Days + (1|Subject)"),
  list(id = "scaled_response", data = "sleep", formula = "I(Reaction/1000) ~ Days + (1|Subject)"),
  list(id = "scale_response", data = "sleep", formula = "scale(Reaction) ~ Days + (1|Subject)"),
  list(id = "offset", data = "sleep", formula = "Reaction ~ Days + offset(2 * Days) + (1|Subject)"),
  list(id = "poly_raw", data = "sleep", formula = "Reaction ~ poly(Days, 2, raw = TRUE) + (1|Subject)"),
  list(id = "poly_orthogonal", data = "sleep", formula = "Reaction ~ poly(Days, 3) + (Days|Subject)"),
  list(id = "scale_center", data = "sleep", formula = "Reaction ~ scale(Days, scale = FALSE) + (1|Subject)"),
  list(id = "scale_covariate", data = "sleep", formula = "Reaction ~ scale(Days) + (1|Subject)"),
  list(id = "log_covariate", data = "sleep", formula = "Reaction ~ log(Days + 1) + (1|Subject)"),
  list(id = "exp_log10_log2", data = "sleep", formula = "Reaction ~ exp(Days/10) + log10(Days + 1) + log2(Days + 2) + (1|Subject)"),
  list(id = "abs_sqrt", data = "sleep", formula = "Reaction ~ abs(Days - 4.5) + sqrt(Days) + (1|Subject)"),
  list(id = "weights", data = "sleep", formula = "Reaction ~ Days + (Days|Subject)", weights = "w"),
  list(id = "missing", data = "sleep", formula = "Reaction ~ Days2 + (1|Subject)"),
  list(id = "cake_ordered", data = "cake", formula = "angle ~ recipe * temperature + (1|recipe:replicate)"),
  list(id = "cake_numeric_temp", data = "cake", formula = "angle ~ recipe + temp + (1|replicate)"),
  list(id = "alfalfa_none_level", data = "alf", formula = "Yield ~ Date + Variety + (1|Block)"),
  # lme4 stops short of these optima (short = TRUE): the tests ask for a log-likelihood at least lme4's
  list(id = "near_collinear", data = "opt", formula = "y ~ x1 + x2 + (1|g)", short = TRUE),
  list(id = "slope_far_from_zero", data = "opt", formula = "y ~ x1 + (z|g)", short = TRUE),
  list(id = "slope_log_covariate", data = "opt", formula = "y2 ~ log(u) + (log(u)|g)")
)
res <- list()
for (cs in cases) {
  d <- switch(cs$data, sleep = sleep, cake = cake, alf = alf, opt = opt)
  for (reml in c(FALSE, TRUE)) {
    f <- as.formula(cs$formula)
    m <- if (is.null(cs$weights)) lmer(f, d, REML = reml) else lmer(f, d, REML = reml, weights = d[[cs$weights]])
    vc <- as.data.frame(VarCorr(m))
    res[[paste0(cs$id, if (reml) "_reml" else "_ml")]] <- list(
      data = cs$data, formula = cs$formula, short = isTRUE(cs$short), weights = if (is.null(cs$weights)) NULL else cs$weights,
      method = if (reml) "REML" else "ML", n_obs = nobs(m), loglik = as.numeric(logLik(m)),
      fixef_names = names(fixef(m)), fixef = unname(fixef(m)), se = unname(sqrt(diag(as.matrix(vcov(m))))),
      sd = vc$sdcor[is.na(vc$var2)], theta = unname(getME(m, "theta")))
  }
}
meta <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")))
writeLines(toJSON(list(meta = meta, cases = res), auto_unbox = TRUE, digits = NA, null = "null"), out)
