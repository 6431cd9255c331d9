// Beside each override of a user's quota, the plan's value a blank one takes: the form (quotas/console/admin.py,
// UserQuotaForm) renders it for the plan chosen when the page loads, and gives the plan select every plan's values
// (data-plan-values) and each override the select it follows (data-plan-select); this follows the select.
(function () {
  "use strict";
  document.querySelectorAll("select[data-plan-values]").forEach(function (select) {
    const plans = JSON.parse(select.dataset.planValues);

    function show() {
      const plan = plans[select.value] || null;
      document.querySelectorAll("[data-plan-select='" + select.id + "']").forEach(function (input) {
        const value = plan ? plan[input.dataset.planField] : null;
        const text = value ? "plan: " + value : "";
        if (input.type !== "checkbox") input.placeholder = text;
        const help = document.querySelector("[data-plan-value='" + input.dataset.planHelp + "']");
        if (help) help.textContent = text;
      });
    }

    select.addEventListener("change", show);
    show();
  });
})();
