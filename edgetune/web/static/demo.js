import { Trainer } from "./edgetune-web.js";
const status = document.getElementById("status");
try {
  const trainer = await Trainer.load("./model/");
  const resumed = await trainer.restoreState();
  window.edgetune = { trainer, resumed };
  status.textContent = `Loaded (${trainer.device}, ${trainer.threads} threads)` + (resumed ? `, resumed at step ${trainer.steps}` : "");
} catch (err) {
  status.textContent = `Could not load the model: ${err.message}`;
  window.edgetune = { error: String(err.stack || err) };
}
