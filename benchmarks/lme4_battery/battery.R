# Real-data battery: exports data sets from R packages to CSV (+ a JSON sidecar with each column's class
# and R's level order) and fits every model ML and REML with lme4 (lmerTest for Satterthwaite df).
#
# Usage: Rscript benchmarks/lme4_battery/battery.R [REPS] [FILTER]
#   REPS   timed lmer fits per model after one warm-up (median reported; default 3)
#   FILTER regular expression on model ids (default: all)
# Writes data/<name>.csv, data/<name>.json and lme4_battery.json next to this script.
suppressPackageStartupMessages({
  library(lme4); library(nlme); library(jsonlite); library(mlmRev); library(MASS)
})
suppressPackageStartupMessages(requireNamespace("lmerTest"))

here <- local({
  a <- grep("^--file=", commandArgs(FALSE), value = TRUE)
  if (length(a)) dirname(normalizePath(sub("^--file=", "", a[1]))) else getwd()
})
args <- commandArgs(TRUE)
REPS <- if (length(args) >= 1) as.integer(args[1]) else 3L
FILTER <- if (length(args) >= 2) args[2] else "."
dir.create(file.path(here, "data"), showWarnings = FALSE)

plain <- function(d) {            # drop groupedData / tibble classes and attributes, keep columns
  d <- as.data.frame(d)
  for (n in names(d)) { a <- d[[n]]; attr(a, "label") <- NULL; attr(a, "units") <- NULL
    if (!is.factor(a) && !is.numeric(a) && !is.character(a)) a <- as.numeric(a)
    if (is.numeric(a) && !is.integer(a)) a <- as.numeric(a)
    d[[n]] <- a }
  d
}
datasets <- list(
  sleepstudy = lme4::sleepstudy, cake = lme4::cake, Dyestuff = lme4::Dyestuff, Pastes = lme4::Pastes,
  Penicillin = lme4::Penicillin, InstEval = lme4::InstEval,
  Orthodont = nlme::Orthodont, Oxboys = nlme::Oxboys, Machines = nlme::Machines, Oats = nlme::Oats,
  Pixel = nlme::Pixel, BodyWeight = nlme::BodyWeight, Rail = nlme::Rail, Alfalfa = nlme::Alfalfa,
  ergoStool = nlme::ergoStool, Ovary = nlme::Ovary, MathAchieve = nlme::MathAchieve, Assay = nlme::Assay,
  Wafer = nlme::Wafer, Dialyzer = nlme::Dialyzer,
  ChickWeight = datasets::ChickWeight, CO2 = datasets::CO2, Orange = datasets::Orange,
  Loblolly = datasets::Loblolly, Theoph = datasets::Theoph, Indometh = datasets::Indometh,
  Exam = mlmRev::Exam, ScotsSec = mlmRev::ScotsSec, Chem97 = mlmRev::Chem97, egsingle = mlmRev::egsingle,
  Gcsemv = mlmRev::Gcsemv, Hsb82 = mlmRev::Hsb82, MASS_oats = MASS::oats
)
datasets <- lapply(datasets, plain)

export <- function(name, d) {
  write.csv(d, file.path(here, "data", paste0(name, ".csv")), row.names = FALSE, na = "")
  cols <- lapply(names(d), function(n) {
    a <- d[[n]]
    cls <- if (is.ordered(a)) "ordered" else if (is.factor(a)) "factor" else if (is.integer(a)) "integer"
           else if (is.numeric(a)) "numeric" else "character"
    list(name = n, class = cls, levels = if (is.factor(a)) levels(a) else NULL)
  })
  writeLines(toJSON(list(name = name, n_rows = nrow(d), columns = cols), auto_unbox = TRUE, pretty = TRUE,
                    null = "null"), file.path(here, "data", paste0(name, ".json")))
}
for (n in names(datasets)) export(n, datasets[[n]])

# id, dataset, formula (exactly as lmer takes it), weights column (or "")
M <- function(id, data, formula, weights = "") list(id = id, data = data, formula = formula, weights = weights)
models <- list(
  M("sleep_slope", "sleepstudy", "Reaction ~ Days + (Days | Subject)"),
  M("sleep_uncorr", "sleepstudy", "Reaction ~ Days + (Days || Subject)"),
  M("sleep_logdays", "sleepstudy", "Reaction ~ log(Days + 1) + (log(Days + 1) | Subject)"),
  M("sleep_poly", "sleepstudy", "Reaction ~ poly(Days, 2) + (1 | Subject)"),
  M("sleep_I2", "sleepstudy", "Reaction ~ Days + I(Days^2) + (1 | Subject)"),
  M("sleep_factor", "sleepstudy", "Reaction ~ factor(Days) + (1 | Subject)"),
  M("sleep_logy", "sleepstudy", "log(Reaction) ~ Days + (1 | Subject)"),
  M("cake_ordered", "cake", "angle ~ recipe * temperature + (1 | recipe:replicate)"),
  M("cake_nested", "cake", "angle ~ recipe + temp + (1 | replicate/recipe)"),
  M("dyestuff", "Dyestuff", "Yield ~ 1 + (1 | Batch)"),
  M("pastes_nested", "Pastes", "strength ~ 1 + (1 | batch/cask)"),
  M("penicillin_crossed", "Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
  M("insteval_crossed", "InstEval", "y ~ service + (1 | s) + (1 | d)"),
  M("orthodont_slope", "Orthodont", "distance ~ age * Sex + (age | Subject)"),
  M("oxboys_three", "Oxboys", "height ~ age + I(age^2) + (age + I(age^2) | Subject)"),
  M("machines_nested", "Machines", "score ~ Machine + (1 | Worker/Machine)"),
  M("machines_colon", "Machines", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)"),
  M("oats_split", "Oats", "yield ~ nitro * Variety + (1 | Block/Variety)"),
  M("oats_factor", "Oats", "yield ~ factor(nitro) + Variety + (1 | Block/Variety)"),
  M("pixel", "Pixel", "pixel ~ day + I(day^2) + Side + (day | Dog) + (1 | Dog:Side)"),
  M("bodyweight", "BodyWeight", "weight ~ Time * Diet + (Time | Rat)"),
  M("rail", "Rail", "travel ~ 1 + (1 | Rail)"),
  M("alfalfa", "Alfalfa", "Yield ~ Date + Variety + (1 | Block/Variety)"),
  M("ergostool", "ergoStool", "effort ~ Type + (1 | Subject)"),
  M("ovary", "Ovary", "follicles ~ sin(2 * pi * Time) + cos(2 * pi * Time) + (1 | Mare)"),
  M("mathach_ses", "MathAchieve", "MathAch ~ SES * Sex + MEANSES + (SES | School)"),
  M("assay", "Assay", "logDens ~ sample * dilut + (1 | Block) + (1 | Block:sample)"),
  M("wafer", "Wafer", "current ~ voltage + I(voltage^2) + (voltage | Wafer)"),
  M("dialyzer", "Dialyzer", "rate ~ QB * pressure + (pressure | Subject)"),
  M("chick_slope", "ChickWeight", "weight ~ Time * Diet + (Time | Chick)"),
  M("chick_sqrt", "ChickWeight", "sqrt(weight) ~ Time + Diet + (Time || Chick)"),
  M("co2", "CO2", "uptake ~ Type * Treatment + log(conc) + (1 | Plant)"),
  M("orange", "Orange", "circumference ~ age + (age | Tree)"),
  M("loblolly_log", "Loblolly", "log(height) ~ log(age) + (1 | Seed)"),
  M("loblolly_offset", "Loblolly", "height ~ age + offset(age) + (1 | Seed)"),
  M("theoph_weights", "Theoph", "conc ~ Time + Dose + (1 | Subject)", weights = "Wt"),
  M("indometh", "Indometh", "log(conc) ~ time + (time | Subject)"),
  M("exam", "Exam", "normexam ~ standLRT * sex + schgend + (standLRT | school)"),
  M("scotssec", "ScotsSec", "attain ~ verbal + sex + social + (1 | primary) + (1 | second)"),
  M("chem97", "Chem97", "score ~ gcsecnt + gender + (1 | lea/school)"),
  M("egsingle", "egsingle", "math ~ year + (year | schoolid) + (1 | childid)"),
  M("gcsemv_na", "Gcsemv", "course ~ gender + (1 | school)"),
  M("gcsemv_na2", "Gcsemv", "written ~ gender * course + (1 | school)"),
  M("hsb82", "Hsb82", "mAch ~ cses * sector + meanses + (cses | school)"),
  M("mass_oats", "MASS_oats", "Y ~ N + V + (1 | B/V)")
)

time_fit <- function(expr_fun, reps) {
  expr_fun()                                   # warm-up
  t <- vapply(seq_len(reps), function(i) system.time(expr_fun())[["elapsed"]], 0)
  median(t)
}
one <- function(m, reml) {
  d <- datasets[[m$data]]
  f <- as.formula(m$formula)
  msgs <- character(0)
  fitf <- function() {
    if (nzchar(m$weights)) lmer(f, data = d, REML = reml, weights = d[[m$weights]])
    else lmer(f, data = d, REML = reml)
  }
  fit <- tryCatch(withCallingHandlers(fitf(),
           warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
           message = function(e) { msgs <<- c(msgs, conditionMessage(e)); invokeRestart("muffleMessage") }),
         error = function(e) e)
  res <- list(id = paste0(m$id, if (reml) "_reml" else "_ml"), model = m$id, dataset = m$data,
              formula = m$formula, weights = if (nzchar(m$weights)) m$weights else NULL,
              method = if (reml) "REML" else "ML", messages = unique(msgs))
  if (inherits(fit, "error")) { res$error <- conditionMessage(fit); return(res) }
  big <- nrow(d) > 20000
  res$time <- time_fit(function() suppressWarnings(suppressMessages(fitf())), if (big) 1L else REPS)
  fe <- fixef(fit); V <- as.matrix(vcov(fit))
  res$fixed <- as.list(fe); res$se <- as.list(sqrt(diag(V)))
  vc <- as.data.frame(VarCorr(fit))
  res$varcorr <- lapply(seq_len(nrow(vc)), function(i) list(grp = vc$grp[i], var1 = vc$var1[i],
                        var2 = vc$var2[i], vcov = vc$vcov[i], sdcor = vc$sdcor[i]))
  res$sigma <- sigma(fit); res$theta <- unname(getME(fit, "theta"))
  res$theta_names <- names(getME(fit, "theta"))
  res$loglik <- as.numeric(logLik(fit)); res$df <- attr(logLik(fit), "df")
  res$n_obs <- nobs(fit); res$singular <- isSingular(fit)
  res$optimizer_messages <- fit@optinfo$conv$lme4$messages
  df <- tryCatch({
    tf <- if (nzchar(m$weights)) lmerTest::lmer(f, data = d, REML = reml, weights = d[[m$weights]])
          else lmerTest::lmer(f, data = d, REML = reml)
    co <- suppressMessages(summary(tf)$coefficients); as.list(co[, "df"]) }, error = function(e) NULL)
  res$df_satterthwaite <- df
  res
}
out <- list()
for (m in models) {
  if (!grepl(FILTER, m$id)) next
  for (reml in c(FALSE, TRUE)) {
    r <- suppressWarnings(suppressMessages(one(m, reml)))
    cat(r$id, if (!is.null(r$error)) paste("ERROR", r$error) else sprintf("%.4f s", r$time), "\n")
    out[[r$id]] <- r
  }
}
info <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
             lmerTest = as.character(packageVersion("lmerTest")), reps = REPS)
writeLines(toJSON(list(info = info, fits = out), auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null"),
           file.path(here, "lme4_battery.json"))
