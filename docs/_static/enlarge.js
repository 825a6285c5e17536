// A click on a figure shows it at the size of the window; a second click (or Escape) puts it back.
document.addEventListener("click", (event) => {
  const img = event.target.closest("article img");
  if (!img || img.closest("a")) return;
  document.querySelectorAll("img.enlarged").forEach((other) => other !== img && other.classList.remove("enlarged"));
  img.classList.toggle("enlarged");
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") document.querySelectorAll("img.enlarged").forEach((img) => img.classList.remove("enlarged"));
});
