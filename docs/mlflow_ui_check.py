"""What a new user sees for the sweep in the MLflow UI, plus a screenshot of its runs table.

MLflow 3.x shows an experiment in the "GenAI" view (traces "Overview") unless the sidebar's
"GenAI | Model training" switch (kept in browser storage) or the URL parameter
``workflowType=machine_learning`` selects the runs table. In a fresh headless Chromium profile
this clicks the experiment on the home page, reports where it landed, opens the link the
project prints, expands the sweep's parent run and writes a 1400x900 screenshot.
It does not start the server; serve the tracking store first, e.g.:

    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server \\
        --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 --workers 1

Usage (needs ``pip install selenium`` and chromium with /usr/bin/chromedriver):

    python docs/mlflow_ui_check.py http://127.0.0.1:5000 reports/mlflow_runs.png [EXPERIMENT]

EXPERIMENT defaults to "cmmasksd".
"""
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

# "Columns" entries to toggle: hide the empty default columns, show the trials' results.
TOGGLE = ("Dataset", "Source", "Models", "final/val/miou", "final/val/oiou",
          "final/testA/miou", "final/testB/miou", "seed")


def browser():
    opts = webdriver.ChromeOptions()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,900", f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900,
                                                                  "deviceScaleFactor": 1, "mobile": False})
    return driver


def report(step, driver):
    view = "runs table" if "/runs" in driver.current_url else "NOT the runs table"
    print(f"{step}\n  landed on {driver.current_url}\n  page {driver.title!r}: {view}")


def main(server, out, name="cmmasksd"):
    server = server.rstrip("/")
    driver = browser()
    wait = WebDriverWait(driver, 60)
    click = lambda xpath: wait.until(EC.element_to_be_clickable((By.XPATH, xpath))).click()
    try:
        driver.get(server + "/")
        click(f"//a[normalize-space(.)='{name}']")
        wait.until(EC.title_contains(" - Experiment "))
        report(f"home page -> click {name!r}", driver)
        exp_id = driver.current_url.split("/experiments/")[1].split("/")[0].split("?")[0]
        link = f"{server}/#/experiments/{exp_id}?workflowType=machine_learning"
        driver.get(link)
        click("//button[contains(@data-component-id, 'runnamecellrenderer')]")  # expand parent run
        report(f"printed link {link}", driver)
        click("//button[normalize-space(.)='Columns']")
        search = driver.find_element(By.XPATH, "//input[@placeholder='Search columns']")
        for label in TOGGLE:
            search.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE, label)
            click(f"//*[@data-testid='column-selector-tree']//*[contains(@class, 'tree-title')][.='{label}']")
        search.send_keys(Keys.ESCAPE)
        grip = driver.find_element(By.XPATH, "//*[@col-id='attributes.`Run Name`']//*[contains(@class, 'resize')]")
        ActionChains(driver).drag_and_drop_by_offset(grip, 130, 0).perform()  # full run names
        for close in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):
            close.click()  # the "MLflow Assistant" side panel
        wait.until(EC.visibility_of_element_located(
            (By.XPATH, f"//*[@role='gridcell'][contains(@col-id, '`{TOGGLE[-1]}`')]")))
        driver.save_screenshot(out)
        print(f"wrote {out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main(*sys.argv[1:])
